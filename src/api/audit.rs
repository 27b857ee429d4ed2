//! `coffre.v1.Audit`: queries, verification and alerts, streamed.

use super::*;

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
                    restores: r
                        .restores
                        .iter()
                        .map(|m| pb::RestoreMark {
                            seq: m.seq,
                            time_unix_ms: m.time_unix_ms,
                            backup_head_seq: m.backup_head_seq,
                            backup_created_unix_ms: m.backup_created_unix_ms,
                        })
                        .collect(),
                    note: r.note.unwrap_or_default(),
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
