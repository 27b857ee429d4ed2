//! The gRPC services: thin. Each RPC goes through [`Gate::run`], which
//! authenticates, checks the role, calls the core, maps the error to a
//! status in one place ([`to_status`]) and records the outcome.

use std::{net::SocketAddr, pin::Pin, sync::Arc};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    accounts::Caller,
    audit::Note,
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
enum Need {
    /// No token (Login).
    Nobody,
    /// Any valid token.
    Anyone,
    /// Clinicians and services: the only roles that touch records.
    RecordReader,
    /// Administrators of tenant `system`.
    Admin,
    Auditor,
}

/// Shared by the services: the vault, plus the per-RPC envelope.
#[derive(Clone)]
pub struct Gate {
    vault: Arc<Vault>,
}

fn bearer(meta: &MetadataMap) -> Option<&str> {
    meta.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl Gate {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }

    /// The caller (if a token was given and is valid), and whether `need`
    /// admits it. The caller is kept even when refused, so the refusal is
    /// attributed to a principal.
    fn authorize(&self, meta: &MetadataMap, need: Need) -> (Option<Caller>, Result<(), Error>) {
        if let Need::Nobody = need {
            return (None, Ok(()));
        }
        let Some(token) = bearer(meta) else {
            return (None, Err(Error::Unauthenticated("missing bearer token")));
        };
        let caller = match self.vault.accounts.authenticate(token) {
            Ok(c) => c,
            Err(e) => return (None, Err(e)),
        };
        let allowed = match need {
            Need::Nobody | Need::Anyone => true,
            Need::RecordReader => caller.role.reads_records(),
            Need::Admin => caller.role == Role::Admin && caller.tenant.is_system(),
            Need::Auditor => caller.role == Role::Auditor,
        };
        if allowed {
            (Some(caller), Ok(()))
        } else {
            (
                Some(caller),
                Err(Error::PermissionDenied("role not allowed for this call")),
            )
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
        need: Need,
        f: impl AsyncFnOnce(Option<Caller>, &mut Note) -> Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let (caller, allowed) = self.authorize(meta, need);
        let mut note = Note::default();
        let principal = caller.as_ref().map(Caller::principal);
        let role = caller.as_ref().map(|c| c.role.as_str()).unwrap_or_default();
        let tenant = caller.as_ref().map(|c| c.tenant.to_string());
        let result = match allowed {
            Ok(()) => f(caller, &mut note).await,
            Err(e) => Err(e),
        };
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => code_name(e),
        };
        let event = pb::AuditEvent {
            tenant: note.tenant.or(tenant).unwrap_or_default(),
            principal: principal.or(note.principal).unwrap_or_default(),
            role: role.to_string(),
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
        if let Err(e) = self.vault.audit.record(event).await {
            tracing::error!(action, error = %e, "audit event not stored: failing the call");
            return Err(to_status(match e {
                Error::Unavailable(s) => Error::Unavailable(s),
                _ => Error::Unavailable(crate::storage::StorageError::Io("audit".into())),
            }));
        }
        result.map(Response::new).map_err(to_status)
    }
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
        Error::OverBudget { .. } => Code::ResourceExhausted,
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
/// Records a BulkRead sends per durable budget write.
const BULK_GROUP: usize = 32;

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
    ($self:ident, $req:ident, $action:literal, $need:expr, $body:expr) => {{
        let peer = $req.remote_addr();
        let (meta, _, msg) = $req.into_parts();
        $self
            .gate
            .run(
                concat!("coffre.v1.", $action),
                &meta,
                peer,
                $need,
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
            Need::Nobody,
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
            Need::Anyone,
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
            Need::Anyone,
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
            Need::RecordReader,
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
            Need::RecordReader,
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
            Need::RecordReader,
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
            Need::RecordReader,
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
            Need::RecordReader,
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
                let (tx, rx) = mpsc::channel(BULK_GROUP);
                let vault = v.clone();
                tokio::spawn(async move {
                    let mut group = Vec::with_capacity(BULK_GROUP);
                    let mut end = None;
                    for id in ids {
                        match vault
                            .read_record(&caller, &tenant, &id, &fields, BULK_READ)
                            .await
                        {
                            Ok(r) => group.push(to_pb(r)),
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
                        if group.len() == BULK_GROUP && !send_group(&vault, &tx, &mut group).await {
                            return;
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
            Need::RecordReader,
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
            Need::RecordReader,
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
            Need::Admin,
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
            Need::Admin,
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
            Need::Admin,
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
            Need::Admin,
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
            Need::Admin,
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
            Need::Admin,
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
            Need::Admin,
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
            Need::Admin,
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
            Need::Admin,
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
            Need::Admin,
            async |_c: Option<Caller>, m: pb::ShredTenantRequest, n: &mut Note| {
                let name = TenantName::parse(&m.tenant)?;
                n.tenant = Some(name.to_string());
                let records = v.shred_tenant(&name, &m.confirm).await?;
                n.fields = vec![format!("records_deleted={records}")];
                Ok(pb::ShredTenantResponse {})
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
            Need::Auditor,
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
                };
                let events = v.audit.query(&q)?;
                Ok(Box::pin(tokio_stream::iter(events.into_iter().map(Ok)))
                    as Self::QueryAuditStream)
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
            Need::Auditor,
            async |_c: Option<Caller>, m: pb::VerifyAuditRequest, _n: &mut Note| {
                let checkpoint = if m.checkpoint_seq == 0 {
                    None
                } else {
                    let hash: [u8; 32] = m.checkpoint_hash.as_slice().try_into().map_err(|_| {
                        Error::InvalidArgument("checkpoint_hash must be 32 bytes".into())
                    })?;
                    Some((m.checkpoint_seq, hash))
                };
                let r = v.audit.verify(checkpoint)?;
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
            Need::Auditor,
            async |c: Option<Caller>, m: pb::ListAlertsRequest, _n: &mut Note| {
                let caller = must(c)?;
                let scope = (!caller.tenant.is_system()).then(|| caller.tenant.to_string());
                let alerts = v.audit.alerts(m.since_unix_ms, scope.as_deref())?;
                Ok(Box::pin(tokio_stream::iter(alerts.into_iter().map(Ok)))
                    as Self::ListAlertsStream)
            }
        )
    }
}
