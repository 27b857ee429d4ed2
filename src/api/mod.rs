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
    if let Error::ApprovalRequired(id) = &e
        && let Ok(v) = id.parse()
    {
        status.metadata_mut().insert("coffre-approval-id", v);
    }
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
    /// Any valid token, including a session that may only enrol a second
    /// factor.
    Enrolling,
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
    "Auth/LoginOidc" => Nobody;
    "Auth/EnrollTotp" => Enrolling;
    "Auth/ConfirmTotp" => Enrolling;
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
    "Admin/Backup" => Admin;
    "Admin/Scrub" => Admin;
    "Admin/ResetMfa" => Admin;
    "Admin/ListApprovals" => Admin;
    "Admin/Approve" => Admin;
    "Admin/Deny" => Admin;
    "Admin/GrantExport" => Admin;
    "Audit/QueryAudit" => Auditor;
    "Audit/VerifyAudit" => Auditor;
    "Audit/ListAlerts" => Auditor;
}

/// Whether `action` changes stored state the backup must hold together
/// with its event.
fn writes(action: &str) -> bool {
    matches!(
        action.strip_prefix("coffre.v1."),
        Some(
            "Records/PutRecord"
                | "Records/DeleteRecord"
                | "Records/SetSecret"
                | "Auth/ChangePassword"
                | "Admin/CreateTenant"
                | "Admin/CreatePrincipal"
                | "Admin/SetPrincipalLocked"
                | "Admin/CreateHoneytoken"
                | "Admin/RotateTenantKey"
                | "Admin/RetireKeyVersion"
                | "Admin/ShredTenant"
                | "Admin/ResetMfa"
                | "Admin/GrantExport"
                | "Admin/Approve"
                | "Admin/Deny"
                | "Auth/ConfirmTotp"
                | "Auth/EnrollTotp"
        )
    )
}

/// Every method the server answers, as request paths: Coffre's, health's
/// and reflection's (the metrics count these by name, any other as
/// unknown).
pub fn known_paths() -> Vec<String> {
    ROUTES
        .iter()
        .map(|r| format!("/{}", r.action))
        .chain(
            [
                "/grpc.health.v1.Health/Check",
                "/grpc.health.v1.Health/Watch",
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            ]
            .map(String::from),
        )
        .collect()
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

/// The call's request id: the client's `x-request-id` when it is a short
/// token (letters, digits, `-_.:`), else a new one. Logged with the call
/// and returned in the response's metadata.
fn request_id(meta: &MetadataMap) -> String {
    meta.get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// A new request id: 64 random bits drawn once per process, then a
/// counter (unique, and no system call per call).
fn new_request_id() -> String {
    use std::sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    };
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| u64::from_be_bytes(crate::crypto::random_array::<8>()));
    format!("{prefix:016x}{:016x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The characters of an unknown method's path looked at; the trail keeps
/// fewer (a field's bound).
const MAX_UNKNOWN_PATH: usize = 256;

/// Shared by the services: the vault, plus the per-RPC envelope.
#[derive(Clone)]
pub struct Gate {
    vault: Arc<Vault>,
    refused: Arc<RefusedCalls>,
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

/// The bearer token, when exactly one `authorization` header carries one
/// (two are refused: which one a proxy or a logger saw is anyone's guess).
fn bearer(meta: &MetadataMap) -> Option<&str> {
    if meta.get_all("authorization").iter().count() != 1 {
        return None;
    }
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
    async fn authorize(&self, meta: &MetadataMap, action: &str, need: Need) -> Authorized {
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
        let caller = match self.vault.accounts.authenticate(token).await {
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
            Need::Nobody | Need::Anyone | Need::Enrolling => true,
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
        } else if caller.enroll_only
            && !matches!(need, Need::Enrolling)
            && action != "coffre.v1.Auth/Logout"
        {
            a.result = Err(Error::PermissionDenied(
                "a second factor is required: enrol (coffre mfa enroll, then coffre mfa confirm) and log in again with a code",
            ));
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

    /// Audits a call of a method the server does not have (tonic answered
    /// UNIMPLEMENTED): its path, cut to a field's bound, and
    /// whoever its token names. Counted as a refused call of its peer, so
    /// a scan of method names is summed up rather than filling the trail.
    pub(super) async fn audit_unknown(
        &self,
        path: &str,
        meta: &MetadataMap,
        peer: Option<SocketAddr>,
    ) {
        if self.over_refusal_limit(peer, "unknown", "unimplemented") {
            return;
        }
        let auth = self.authorize(meta, "unknown", Need::Anyone).await;
        // The path is the client's text: bounded like a request's fields.
        let mut note = Note {
            fields: vec![format!(
                "path={}",
                path.chars()
                    .take(MAX_UNKNOWN_PATH)
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect::<String>()
            )],
            ..Default::default()
        };
        note.bound();
        let event = pb::AuditEvent {
            tenant: auth.tenant.unwrap_or_default(),
            principal: auth.principal.unwrap_or_default(),
            role: auth.role,
            action: "unknown".into(),
            fields: note.fields,
            outcome: "unimplemented".into(),
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        if let Err(e) = self.vault.audit.record(event).await {
            tracing::error!(error = %e, "unknown-method event not stored");
        }
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
        let started = std::time::Instant::now();
        let need = route_of(action).need;
        let auth = self.authorize(meta, action, need).await;
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
        // A write and its event fall on the same side of a consistent cut
        // (a backup holds exactly the writes whose events it holds).
        let _scope = if writes(action) {
            Some(self.vault.store.write_scope().await)
        } else {
            None
        };
        // The approval a guarded call spends is named in its event.
        let (result, spent) = crate::approvals::SPENT
            .scope(std::cell::RefCell::new(None), async {
                let r = match auth.result {
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
                (r, crate::approvals::SPENT.with(|s| s.borrow_mut().take()))
            })
            .await;
        let outcome = outcome_of(&result);
        if let Err(Error::ApprovalRequired(id)) = &result {
            note.fields.push(format!("approval={id}"));
        } else if let Some(id) = spent {
            note.fields.push(format!("approval={id}"));
        }
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
        // One line per call: who, what, how it ended, and the audit event
        // that holds it; never a value.
        let request_id = request_id(meta);
        let (principal, peer, outcome) = (
            event.principal.clone(),
            event.peer.clone(),
            event.outcome.clone(),
        );
        // Milliseconds to the microsecond.
        let ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let recorded = self.vault.audit.record(event).await;
        let tag = |mut meta: MetadataMap| {
            if let Ok(v) = request_id.parse() {
                meta.insert("x-request-id", v);
            }
            meta
        };
        match recorded {
            Ok(r) => tracing::info!(
                request_id,
                action,
                principal,
                peer,
                outcome,
                ms,
                audit_seq = r.seq,
                "rpc"
            ),
            Err(e) => {
                tracing::error!(request_id, action, principal, peer, error = %e, "audit event not stored: failing the call");
                let mut status = to_status(match e {
                    Error::Unavailable(s) => Error::Unavailable(s),
                    _ => Error::Unavailable(crate::store::StorageError::Io("audit".into())),
                });
                *status.metadata_mut() = tag(std::mem::take(status.metadata_mut()));
                return Err(status);
            }
        }
        match result {
            Ok(r) => {
                let mut resp = Response::new(r.hold(self, permit, what));
                *resp.metadata_mut() = tag(std::mem::take(resp.metadata_mut()));
                Ok(resp)
            }
            Err(e) => {
                let mut status = to_status(e);
                *status.metadata_mut() = tag(std::mem::take(status.metadata_mut()));
                Err(status)
            }
        }
    }

    /// Streams `source` to the client through a small buffer; a reader
    /// that takes longer than `connections.stream_send_timeout_secs` for
    /// one message gets no more (its buffers are freed), and the drop is
    /// audited with the count sent. The permit is held until the end.
    ///
    /// A dropped stream never ends OK: after what was already buffered,
    /// the client reads DEADLINE_EXCEEDED saying why. The status cannot
    /// go through the full buffer, so it waits beside it and follows the
    /// buffer's last message.
    fn guard_stream<T: Send + 'static>(
        &self,
        mut source: BoxStream<T>,
        what: StreamOf,
        permit: Option<StreamPermit>,
    ) -> BoxStream<T> {
        let (tx, rx) = mpsc::channel(2);
        let timeout = Duration::from_secs(self.vault.connections.stream_send_timeout_secs);
        let audit = self.vault.audit.clone();
        let dropped = Arc::new(std::sync::OnceLock::<String>::new());
        let why = dropped.clone();
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
                        // Set before `tx` drops, so the end of the buffer
                        // always finds it.
                        let _ = why.set(format!(
                            "stream dropped: the client stopped reading for {} s; {sent} messages were sent, the rest were not",
                            timeout.as_secs()
                        ));
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
        let end = futures::stream::once(async move {
            dropped
                .get()
                .map(|why| Err(Status::deadline_exceeded(why.clone())))
        })
        .filter_map(std::future::ready);
        Box::pin(ReceiverStream::new(rx).chain(end))
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
    pb::EnrollTotpResponse,
    pb::ConfirmTotpResponse,
    pb::ResetMfaResponse,
    pb::ListApprovalsResponse,
    pb::ApproveResponse,
    pb::DenyResponse,
    pb::GrantExportResponse,
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
        Error::FailedPrecondition(_) | Error::ApprovalRequired(_) => Code::FailedPrecondition,
        Error::OverBudget { .. } | Error::TooManyCalls | Error::TooManyRefused => {
            Code::ResourceExhausted
        }
        Error::DataLoss => Code::DataLoss,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
    }
}

/// The caller of an RPC whose `Need` guarantees one.
fn must(caller: Option<Caller>) -> Result<Caller, Error> {
    caller.ok_or(Error::Unauthenticated("missing bearer token"))
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

mod admin;
mod audit;
mod auth;
mod front;
mod records;

pub use admin::AdminService;
pub use audit::AuditService;
pub use auth::AuthService;
pub use front::{Front, FrontLayer};
pub use records::RecordsService;

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
