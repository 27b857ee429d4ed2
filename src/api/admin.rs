//! `coffre.v1.Admin`: tenants, principals, honeytokens, keys.

use super::*;

/// The tenant an administrator's key call is about, noted for the trail.
pub(super) async fn admin_target(
    v: &Vault,
    name: &str,
    n: &mut Note,
) -> Result<Arc<crate::tenants::Tenant>, Error> {
    let name = TenantName::parse(name)?;
    n.tenant = Some(name.to_string());
    v.tenants.get(&name).await
}

/// Where a long key job reports its progress.
#[derive(Clone)]
pub(super) struct Progress(mpsc::Sender<Result<pb::RewrapProgress, Status>>);

impl Progress {
    /// Drops a report the client is too slow for: the last one counts.
    fn report(&self, done: u64, total: u64) {
        let _ = self.0.try_send(Ok(pb::RewrapProgress { done, total }));
    }
}

/// Runs a tenant-wide key job in its own task and streams its progress; the
/// last message is `{total, total}` or the error. The job goes on if the
/// client leaves: it is resumable, and half done is worth keeping.
pub(super) fn progress_stream<F>(job: impl FnOnce(Progress) -> F) -> BoxStream<pb::RewrapProgress>
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
            async |c: Option<Caller>, m: pb::CreatePrincipalRequest, n: &mut Note| {
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
                if !v.tenants.exists(&tenant).await? {
                    return Err(Error::NotFound);
                }
                let oidc = if m.oidc.is_empty() {
                    None
                } else {
                    let b = v.check_binding(&tenant, &m.oidc, role)?;
                    n.fields.push(format!("oidc={}", b.provider));
                    Some(b)
                };
                // A principal bound to an identity may sign in only by it.
                let password = if m.password.is_empty() && oidc.is_some() {
                    None
                } else {
                    Some(Password::new_checked(
                        m.password,
                        &[username.as_str(), tenant.as_str()],
                    )?)
                };
                n.fields.push(format!("role={}", role.as_str()));
                v.create_principal(
                    crate::vault::NewPrincipal {
                        tenant: &tenant,
                        username: &username,
                        password: password.as_ref(),
                        role,
                        oidc: oidc.as_ref(),
                    },
                    &must(c)?,
                )
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
            async |c: Option<Caller>, m: pb::SetPrincipalLockedRequest, n: &mut Note| {
                let tenant = TenantName::parse(&m.tenant)?;
                n.tenant = Some(tenant.to_string());
                let username = Username::parse(&m.username)?;
                // The subject of an account call is named in `fields`.
                n.fields = vec![format!("username={username}")];
                v.set_principal_locked(&tenant, &username, m.locked, &must(c)?)
                    .await?;
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
                let tenant = v.tenants.get(&name).await?;
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
                let tenant = admin_target(&v, &m.tenant, n).await?;
                let version = v.rotate_tenant_key(&tenant).await?;
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
                let tenant = admin_target(&v, &m.tenant, n).await?;
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
                let tenant = admin_target(&v, &m.tenant, n).await?;
                let usage = v.records.key_usage(&tenant).await?;
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
            async |c: Option<Caller>, m: pb::RetireKeyVersionRequest, n: &mut Note| {
                let tenant = admin_target(&v, &m.tenant, n).await?;
                n.fields = vec![format!("version={}", m.version)];
                v.retire_key_version(&tenant, m.version, &must(c)?).await?;
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
                let tenant = admin_target(&v, &m.tenant, n).await?;
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
            async |c: Option<Caller>, m: pb::ShredTenantRequest, n: &mut Note| {
                let name = TenantName::parse(&m.tenant)?;
                n.tenant = Some(name.to_string());
                let records = v.shred_tenant(&name, &m.confirm, &must(c)?).await?;
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
                if !v.tenants.exists(&tenant).await? {
                    return Err(Error::NotFound);
                }
                let principals = v
                    .accounts
                    .list(&tenant)
                    .await?
                    .into_iter()
                    .map(|p| pb::PrincipalInfo {
                        username: p.username,
                        role: p.role,
                        locked: p.locked,
                        lock_reason: p.lock_reason,
                        locked_until_unix_ms: p.locked_until_ms,
                        failed_logins: p.failed_logins,
                        mfa_enrolled: p.mfa_enrolled,
                        recovery_codes_left: p.recovery_codes_left,
                        oidc: p.oidc,
                    })
                    .collect();
                Ok(pb::ListPrincipalsResponse { principals })
            }
        )
    }

    type BackupStream = BoxStream<pb::BackupChunk>;

    async fn backup(
        &self,
        req: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/Backup",
            async |_c: Option<Caller>, _m: pb::BackupRequest, n: &mut Note| {
                let started = crate::ops::backup::start(&v).await?;
                n.fields = vec![
                    format!("audit_head_seq={}", started.manifest().audit_head_seq),
                    format!("writes_held_us={}", started.held().as_micros()),
                ];
                let (tx, rx) = mpsc::channel::<Vec<u8>>(2);
                let (fail, failed) = tokio::sync::oneshot::channel::<Status>();
                let vault = v.clone();
                tokio::spawn(async move {
                    match started.stream(&tx).await {
                        Ok(m) => vault.note_backup(m.created_unix_ms).await,
                        Err(e) => {
                            tracing::error!(error = %e, "backup stream failed");
                            let _ = fail.send(to_status(e.into()));
                        }
                    }
                });
                // The bytes, then the producer's error if it failed.
                let data = ReceiverStream::new(rx).map(|data| Ok(pb::BackupChunk { data }));
                let end = futures::stream::once(failed)
                    .filter_map(|r| std::future::ready(r.ok().map(Err)));
                Ok(Box::pin(data.chain(end)) as BoxStream<pb::BackupChunk>)
            }
        )
    }

    type ScrubStream = BoxStream<pb::ScrubProgress>;

    async fn scrub(
        &self,
        req: Request<pb::ScrubRequest>,
    ) -> Result<Response<Self::ScrubStream>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/Scrub",
            async |_c: Option<Caller>, _m: pb::ScrubRequest, _n: &mut Note| {
                let (tx, rx) = mpsc::channel(16);
                let vault = v.clone();
                let to_pb = |c: crate::ops::scrub::ScrubCount| pb::ScrubProgress {
                    tenant: c.tenant,
                    checked: c.checked,
                    total: c.total,
                    failed: c.failed,
                };
                // Runs to its end even if the client leaves: its failures
                // are alerts.
                tokio::spawn(async move {
                    let progress = tx.clone();
                    let run = crate::ops::scrub::scrub(&vault, |c| {
                        let _ = progress.try_send(Ok(to_pb(c)));
                    })
                    .await;
                    match run {
                        Ok((tenants, total)) => {
                            for c in tenants.into_iter().chain([total]) {
                                if tx.send(Ok(to_pb(c))).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(to_status(e))).await;
                        }
                    }
                });
                Ok(Box::pin(ReceiverStream::new(rx)) as BoxStream<pb::ScrubProgress>)
            }
        )
    }

    async fn reset_mfa(
        &self,
        req: Request<pb::ResetMfaRequest>,
    ) -> Result<Response<pb::ResetMfaResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/ResetMfa",
            async |c: Option<Caller>, m: pb::ResetMfaRequest, n: &mut Note| {
                let tenant = TenantName::parse(&m.tenant)?;
                n.tenant = Some(tenant.to_string());
                let username = Username::parse(&m.username)?;
                n.fields = vec![format!("username={username}")];
                v.reset_mfa(&tenant, &username, &must(c)?).await?;
                Ok(pb::ResetMfaResponse {})
            }
        )
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/ListApprovals",
            async |_c: Option<Caller>, m: pb::ListApprovalsRequest, _n: &mut Note| {
                let now = crate::clock::now_ms();
                let query = crate::approvals::ListQuery {
                    state: Some(m.state).filter(|s| !s.is_empty()),
                    limit: m.limit as usize,
                    before_id: Some(approval_id(&m.before_id)?)
                        .filter(|id| !id.is_empty())
                        .map(str::to_string),
                };
                let approvals = v
                    .approvals
                    .list(&query)
                    .await?
                    .into_iter()
                    .map(|a| pb::Approval {
                        state: a.state_at(now).to_string(),
                        id: a.id,
                        action: a.action,
                        target: a.target,
                        requested_by: a.requested_by,
                        requested_at_unix_ms: a.requested_ms,
                        expires_at_unix_ms: a.expires_ms,
                        decided_by: a.decided_by,
                    })
                    .collect();
                Ok(pb::ListApprovalsResponse { approvals })
            }
        )
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApproveResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/Approve",
            async |c: Option<Caller>, m: pb::ApproveRequest, n: &mut Note| {
                decide(&v, c, &m.id, n, true).await?;
                Ok(pb::ApproveResponse {})
            }
        )
    }

    async fn deny(
        &self,
        req: Request<pb::DenyRequest>,
    ) -> Result<Response<pb::DenyResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/Deny",
            async |c: Option<Caller>, m: pb::DenyRequest, n: &mut Note| {
                decide(&v, c, &m.id, n, false).await?;
                Ok(pb::DenyResponse {})
            }
        )
    }

    async fn grant_export(
        &self,
        req: Request<pb::GrantExportRequest>,
    ) -> Result<Response<pb::GrantExportResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Admin/GrantExport",
            async |c: Option<Caller>, m: pb::GrantExportRequest, n: &mut Note| {
                let tenant = TenantName::parse(&m.tenant)?;
                n.tenant = Some(tenant.to_string());
                let username = Username::parse(&m.username)?;
                n.fields = vec![
                    format!("username={username}"),
                    format!("max_records={}", m.max_records),
                    format!("hours={}", m.hours),
                ];
                let purpose = Purpose::parse_required(&m.purpose)?;
                n.purpose = purpose.as_str().to_string();
                v.grant_export(
                    &tenant,
                    &username,
                    m.max_records,
                    &purpose,
                    m.hours,
                    &must(c)?,
                )
                .await?;
                Ok(pb::GrantExportResponse {})
            }
        )
    }
}

/// Approves or denies an approval request; the trail names it.
async fn decide(
    v: &Vault,
    c: Option<Caller>,
    id: &str,
    n: &mut Note,
    yes: bool,
) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::InvalidArgument("approval id is ap-<hex>".into()));
    }
    let id = approval_id(id)?;
    n.fields = vec![format!("approval={id}")];
    let a = v.decide_approval(id, &must(c)?, yes).await?;
    n.fields.push(format!("action={}", a.action));
    n.tenant = a.target_field("tenant").map(str::to_string);
    Ok(())
}

/// An approval id as given (`ap-<hex>`), or empty.
fn approval_id(id: &str) -> Result<&str, Error> {
    if id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(Error::InvalidArgument("approval id is ap-<hex>".into()));
    }
    Ok(id)
}
