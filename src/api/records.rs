//! `coffre.v1.Records`: the record calls, each a thin wrapper over the vault.

use super::*;

/// The tenant, record and secret name a SetSecret/VerifySecret call is
/// about, noted for the audit event before they are parsed.
pub(super) async fn secret_target(
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
    Ok((v.tenants.get(&caller.tenant).await?, id, name))
}

pub(super) const GET_RECORD: &str = "coffre.v1.Records/GetRecord";

pub(super) const FIND_RECORDS: &str = "coffre.v1.Records/FindRecords";

pub(super) const BULK_READ: &str = "coffre.v1.Records/BulkRead";

/// Records a BulkRead sends per durable budget write, at most.
pub(super) const BULK_GROUP: usize = 32;

/// ... and bytes of field values per group: with records of up to 1 MiB,
/// 32 of them held per stalled stream would be 32 MiB.
pub(super) const BULK_GROUP_BYTES: usize = 1 << 20;

/// Makes the budget spent on `group` durable, then sends it. False when the
/// stream is over (client gone, or storage failed and said so).
pub(super) async fn send_group(
    tx: &mpsc::Sender<Result<pb::Record, Status>>,
    group: &mut Vec<pb::Record>,
) -> bool {
    if group.is_empty() {
        return true;
    }
    for r in group.drain(..) {
        if tx.send(Ok(r)).await.is_err() {
            return false;
        }
    }
    true
}

pub(super) fn to_pb(r: PlainRecord) -> pb::Record {
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

pub struct RecordsService {
    gate: Gate,
}

impl RecordsService {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
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
                let tenant = v.tenants.get(&caller.tenant).await?;
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
                let reads = v.begin_reads(&caller, &purpose, 1).await?;
                mark_grant(&reads, n);
                let rec = v
                    .read_record(&caller, &reads, &id, &fields, GET_RECORD)
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
                let tenant = v.tenants.get(&caller.tenant).await?;
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
                let reads = v.begin_reads(&caller, &purpose, 0).await?;
                let ids = v
                    .find_records(&caller, &reads.tenant, &field, &m.value, FIND_RECORDS)
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
                let reads = v.begin_reads(&caller, &purpose, ids.len()).await?;
                mark_grant(&reads, n);
                // Records go out in small groups. What they spend needs no
                // write: the call's event, durable before the stream
                // starts, names every id (a restart counts them all). The
                // stream ends at the budget's edge.
                let (tx, rx) = mpsc::channel(2);
                let vault = v.clone();
                tokio::spawn(async move {
                    let mut group = Vec::with_capacity(BULK_GROUP);
                    let mut bytes = 0usize;
                    let mut end = None;
                    for id in ids {
                        match vault
                            .read_record(&caller, &reads, &id, &fields, BULK_READ)
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
                            if !send_group(&tx, &mut group).await {
                                return;
                            }
                        }
                    }
                    if send_group(&tx, &mut group).await
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
                let (tenant, id, name) = secret_target(&v, c, &m.record_id, &m.name, n).await?;
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
                let (tenant, id, name) = secret_target(&v, c, &m.record_id, &m.name, n).await?;
                let ok = v
                    .records
                    .verify_secret(&tenant, &id, &name, m.candidate)
                    .await?;
                Ok(pb::VerifySecretResponse { ok })
            }
        )
    }
}

/// Names a read under an export grant as such in its event (first of its
/// fields, so that no cut of the list drops it).
fn mark_grant(reads: &crate::vault::Reads, n: &mut Note) {
    if reads.granted() {
        n.fields.insert(0, crate::grants::GRANT_MARK.into());
    }
}
