//! The audit trail: one event per RPC, chained by an HMAC so that an edited,
//! inserted, deleted or reordered event is found, written durably before
//! the response leaves (fail-closed), and mirrored as JSON lines.
//!
//! `hash_n = HMAC-SHA256(audit_key, hash_{n-1} ‖ canonical(event_n))`, with
//! `hash_0` all zeroes. Events carry names, ids, purposes and outcomes:
//! never a field value, password or token.

use std::{fs::File, io::Write, path::Path};

use parking_lot::Mutex;
use prost::Message;

use crate::{
    accounts::now_ms,
    crypto::{self, Context, SecretKey},
    error::{Error, Result},
    pb::{Alert, AuditEvent},
    storage::{Batch, Space, Storage},
};

/// Where the chain starts after pruning: `seq ‖ prev_hash ‖ MAC`.
const BASE_KEY: &[u8] = b"audit_base";
const GENESIS: [u8; 32] = [0; 32];

/// What a handler says about its call, for the event.
#[derive(Debug, Default, Clone)]
pub struct Note {
    /// The tenant acted on, when no caller names it (Login, admin calls).
    pub tenant: Option<String>,
    /// The principal attempted, when there is no caller yet (Login).
    pub principal: Option<String>,
    pub record_ids: Vec<String>,
    pub fields: Vec<String>,
    pub purpose: String,
}

/// Appended to whatever the trail cut short.
pub const CUT_MARK: &str = "…[cut]";

/// `s` cut to at most `max` bytes (on a character boundary) and marked.
fn cut(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(CUT_MARK);
}

/// A list cut to at most `max` items of at most `item` bytes; the last
/// item kept says how many were left out.
fn cut_list(v: &mut Vec<String>, max: usize, item: usize) {
    if v.len() > max {
        let left = v.len() - max;
        v.truncate(max);
        v.push(format!("{CUT_MARK} {left} more"));
    }
    for s in v.iter_mut() {
        cut(s, item);
    }
}

impl Note {
    /// Bounds what the trail keeps of a request (the input limits: ids of
    /// 128 bytes, 1000 of them, 256 field names, a purpose of 256 bytes),
    /// so that a rejected oversize request costs the trail no more than a
    /// valid one. Anything cut ends with [`CUT_MARK`].
    pub fn bound(&mut self) {
        use crate::model::{MAX_BULK_IDS, MAX_FIELDS, MAX_ID_BYTES, MAX_PURPOSE_BYTES};
        cut(&mut self.purpose, MAX_PURPOSE_BYTES);
        cut_list(&mut self.record_ids, MAX_BULK_IDS, MAX_ID_BYTES);
        // Field names are 64 bytes; account calls name `username=<name>`.
        cut_list(&mut self.fields, MAX_FIELDS, 128);
        for s in [&mut self.tenant, &mut self.principal]
            .into_iter()
            .flatten()
        {
            cut(s, 256);
        }
    }
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub ok: bool,
    pub checked: u64,
    /// The first sequence number that fails (0 when `ok`).
    pub first_bad_seq: u64,
    pub head_seq: u64,
    pub head_hash: [u8; 32],
    pub reason: Option<String>,
}

/// Filters of `QueryAudit`; empty strings and zeroes match everything.
#[derive(Debug, Default, Clone)]
pub struct Query {
    /// Restricts to one tenant (an auditor's own), whatever `tenant` says.
    pub scope: Option<String>,
    pub tenant: String,
    pub principal: String,
    pub record_id: String,
    pub action: String,
    pub outcome: String,
    pub since_unix_ms: i64,
    pub until_unix_ms: i64,
    pub limit: usize,
    pub newest_first: bool,
}

struct Head {
    seq: u64,
    hash: [u8; 32],
}

pub struct Audit {
    store: Storage,
    key: SecretKey,
    head: Mutex<Head>,
    mirror: Option<Mutex<File>>,
    alert_file: Option<Mutex<File>>,
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Opens a JSON-lines file for appending, created 0600: it names who read
/// which record, which is no one else's business on the host. An existing
/// file readable by group or others is narrowed to 0600.
fn append_line(path: &Path) -> Result<Mutex<File>> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| Error::Internal(format!("{}: {e}", path.display()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let mode = f.metadata().map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "narrowing permissions to 0600");
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    Ok(Mutex::new(f))
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The bytes the chain MACs for one event (everything but the hashes).
pub fn canonical(e: &AuditEvent) -> Vec<u8> {
    let mut c = Context::new("coffre/audit/v1");
    c.push(&e.seq.to_be_bytes())
        .push(&e.time_unix_ms.to_be_bytes())
        .push(e.tenant.as_bytes())
        .push(e.principal.as_bytes())
        .push(e.role.as_bytes())
        .push(e.action.as_bytes())
        .push(&(e.record_ids.len() as u64).to_be_bytes());
    for id in &e.record_ids {
        c.push(id.as_bytes());
    }
    c.push(&(e.fields.len() as u64).to_be_bytes());
    for f in &e.fields {
        c.push(f.as_bytes());
    }
    c.push(e.purpose.as_bytes())
        .push(e.outcome.as_bytes())
        .push(e.peer.as_bytes());
    c.as_bytes().to_vec()
}

impl Audit {
    pub fn open(
        store: Storage,
        key: SecretKey,
        mirror: Option<&Path>,
        alert_file: Option<&Path>,
    ) -> Result<Self> {
        // The head is the last stored event: one write per event, no
        // second key to keep in step. A truncated tail shows against the
        // auditor's checkpoint and the mirror.
        let head = match store.last(Space::Audit)? {
            Some((_, v)) => {
                let e = AuditEvent::decode(&v[..])?;
                Head {
                    seq: e.seq,
                    hash: e.hash.as_slice().try_into().map_err(|_| Error::DataLoss)?,
                }
            }
            None => Head {
                seq: 0,
                hash: GENESIS,
            },
        };
        Ok(Self {
            store,
            key,
            head: Mutex::new(head),
            mirror: mirror.map(append_line).transpose()?,
            alert_file: alert_file.map(append_line).transpose()?,
        })
    }

    /// Chains and stores one event, and returns once it is durable. An
    /// error means the event is not stored: the caller must fail the RPC.
    pub async fn record(&self, mut e: AuditEvent) -> Result<AuditEvent> {
        {
            let mut head = self.head.lock();
            e.seq = head.seq + 1;
            e.time_unix_ms = now_ms();
            e.prev_hash = head.hash.to_vec();
            let hash = self.chain_hash(&head.hash, &e);
            e.hash = hash.to_vec();
            let mut b = Batch::new();
            b.put(Space::Audit, seq_key(e.seq).to_vec(), e.encode_to_vec());
            self.store.apply(b).map_err(Error::Unavailable)?;
            head.seq = e.seq;
            head.hash = hash;
            if let Some(m) = &self.mirror {
                let line = format!("{}\n", to_json(&e));
                // The store has the event already; a mirror failure is
                // logged, not fatal, and `verify --mirror` will show the gap.
                if let Err(err) = m.lock().write_all(line.as_bytes()) {
                    tracing::error!(error = %err, "audit mirror write failed");
                }
            }
        }
        self.store.sync().await.map_err(Error::Unavailable)?;
        Ok(e)
    }

    /// Raises an alert: an audit event (action `alert/<kind>`, outcome the
    /// severity, `purpose` the detail) and a JSON line in `alert_file`.
    /// `detail` must name no value: counts and durations only.
    pub async fn alert(
        &self,
        severity: Severity,
        kind: &str,
        tenant: &str,
        principal: &str,
        detail: String,
    ) -> Result<()> {
        let e = self
            .record(AuditEvent {
                tenant: tenant.into(),
                principal: principal.into(),
                action: format!("alert/{kind}"),
                outcome: severity.as_str().into(),
                purpose: detail,
                ..Default::default()
            })
            .await?;
        let a = event_to_alert(&e);
        tracing::warn!(kind, severity = severity.as_str(), principal, "alert");
        if let Some(f) = &self.alert_file {
            let line = format!("{}\n", alert_json(&a));
            if let Err(err) = f.lock().write_all(line.as_bytes()) {
                tracing::error!(error = %err, "alert file write failed");
            }
        }
        Ok(())
    }

    /// Alerts since `since_unix_ms`, limited to `scope` when given.
    pub fn alerts(&self, since_unix_ms: i64, scope: Option<&str>) -> Result<Vec<Alert>> {
        let mut out = Vec::new();
        for (_, v) in self.all()? {
            let e = AuditEvent::decode(&v[..])?;
            if e.action.starts_with("alert/")
                && e.time_unix_ms >= since_unix_ms
                && scope.is_none_or(|s| e.tenant == s)
            {
                out.push(event_to_alert(&e));
            }
        }
        Ok(out)
    }

    fn chain_hash(&self, prev: &[u8], e: &AuditEvent) -> [u8; 32] {
        let mut data = prev.to_vec();
        data.extend_from_slice(&canonical(e));
        crypto::hmac_sha256(&self.key, &data)
    }

    fn all(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self.store.scan_prefix(Space::Audit, b"", usize::MAX)?)
    }

    /// Recomputes the whole chain; names the first sequence number that
    /// fails. `checkpoint` (seq, hash) is a head the auditor kept elsewhere:
    /// the chain must still reach it.
    pub fn verify(&self, checkpoint: Option<(u64, [u8; 32])>) -> Result<Verification> {
        let stored_head = self.head.lock().seq;
        let (base_seq, base_prev) = self.base()?;
        let mut prev = base_prev;
        let mut checked = 0u64;
        let bad = |seq: u64, why: &str, prev: [u8; 32], checked| Verification {
            ok: false,
            checked,
            first_bad_seq: seq,
            head_seq: stored_head,
            head_hash: prev,
            reason: Some(why.to_string()),
        };
        // A checkpoint older than the retention window can no longer be
        // checked; the authenticated base stands in for it.
        let mut seen_checkpoint = checkpoint.is_none_or(|(cs, _)| cs < base_seq);
        for (expect_seq, (k, v)) in (base_seq..).zip(self.all()?) {
            let key_seq = k.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
            // Events appended while we scan are for the next verification.
            if key_seq > stored_head && key_seq == expect_seq {
                break;
            }
            let Ok(e) = AuditEvent::decode(&v[..]) else {
                return Ok(bad(key_seq, "event does not decode", prev, checked));
            };
            if key_seq != expect_seq || e.seq != expect_seq {
                return Ok(bad(expect_seq, "sequence gap or reordering", prev, checked));
            }
            if e.prev_hash != prev {
                return Ok(bad(e.seq, "previous hash does not match", prev, checked));
            }
            let h = self.chain_hash(&prev, &e);
            if !crypto::ct_eq(&h, &e.hash) {
                return Ok(bad(e.seq, "event was modified", prev, checked));
            }
            if let Some((cs, ch)) = checkpoint
                && cs == e.seq
            {
                if !crypto::ct_eq(&ch, &h) {
                    return Ok(bad(e.seq, "checkpoint hash differs", prev, checked));
                }
                seen_checkpoint = true;
            }
            prev = h;
            checked += 1;
        }
        if checked + base_seq - 1 != stored_head {
            return Ok(bad(
                checked + base_seq,
                "events missing at the tail",
                prev,
                checked,
            ));
        }
        if !seen_checkpoint {
            let cs = checkpoint.map_or(0, |c| c.0);
            return Ok(bad(
                cs,
                "chain no longer reaches the checkpoint (truncated)",
                prev,
                checked,
            ));
        }
        Ok(Verification {
            ok: true,
            checked,
            first_bad_seq: 0,
            head_seq: stored_head,
            head_hash: prev,
            reason: None,
        })
    }

    fn base_mac(&self, seq: u64, prev: &[u8]) -> [u8; 32] {
        let c = Context::new("coffre/audit-base/v1")
            .with(&seq.to_be_bytes())
            .with(prev);
        crypto::hmac_sha256(&self.key, c.as_bytes())
    }

    /// The first kept sequence number and the hash it continues from.
    fn base(&self) -> Result<(u64, [u8; 32])> {
        let Some(v) = self.store.get(Space::Meta, BASE_KEY)? else {
            return Ok((1, GENESIS));
        };
        if v.len() != 72 {
            return Err(Error::DataLoss);
        }
        let seq = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
        let mut prev = [0u8; 32];
        prev.copy_from_slice(&v[8..40]);
        if !crypto::ct_eq(&self.base_mac(seq, &prev), &v[40..]) {
            return Err(Error::DataLoss);
        }
        Ok((seq, prev))
    }

    /// Deletes events older than `before_unix_ms` (never the newest), and
    /// records where the kept chain starts so it still verifies. Returns
    /// how many events went.
    pub async fn prune(&self, before_unix_ms: i64) -> Result<u64> {
        let head = self.head.lock().seq;
        let mut b = Batch::new();
        let mut new_base = None;
        for (k, v) in self.all()? {
            let e = AuditEvent::decode(&v[..])?;
            if e.time_unix_ms >= before_unix_ms || e.seq >= head {
                new_base = Some((e.seq, e.prev_hash));
                break;
            }
            b.delete(Space::Audit, k);
        }
        let n = b.0.len() as u64;
        let Some((seq, prev)) = new_base.filter(|_| n > 0) else {
            return Ok(0);
        };
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(&prev);
        v.extend_from_slice(&self.base_mac(seq, &prev));
        b.put(Space::Meta, BASE_KEY.to_vec(), v);
        self.store.commit(b).await.map_err(Error::Unavailable)?;
        Ok(n)
    }

    /// Events matching `q`, oldest first unless `q.newest_first`.
    pub fn query(&self, q: &Query) -> Result<Vec<AuditEvent>> {
        let mut out = Vec::new();
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let mut rows = self.all()?;
        if q.newest_first {
            rows.reverse();
        }
        for (_, v) in rows {
            let e = AuditEvent::decode(&v[..])?;
            let keep = q.scope.as_deref().is_none_or(|s| e.tenant == s)
                && (q.tenant.is_empty() || e.tenant == q.tenant)
                && (q.principal.is_empty() || e.principal == q.principal)
                && (q.record_id.is_empty() || e.record_ids.contains(&q.record_id))
                && (q.action.is_empty()
                    || e.action == q.action
                    || e.action.ends_with(&format!("/{}", q.action)))
                && (q.outcome.is_empty() || e.outcome == q.outcome)
                && (q.since_unix_ms == 0 || e.time_unix_ms >= q.since_unix_ms)
                && (q.until_unix_ms == 0 || e.time_unix_ms < q.until_unix_ms);
            if keep {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

fn event_to_alert(e: &AuditEvent) -> Alert {
    Alert {
        seq: e.seq,
        time_unix_ms: e.time_unix_ms,
        severity: e.outcome.clone(),
        tenant: e.tenant.clone(),
        principal: e.principal.clone(),
        kind: e.action.trim_start_matches("alert/").to_string(),
        detail: e.purpose.clone(),
    }
}

/// One alert as a JSON object.
pub fn alert_json(a: &Alert) -> serde_json::Value {
    serde_json::json!({
        "seq": a.seq,
        "time_unix_ms": a.time_unix_ms,
        "severity": a.severity,
        "tenant": a.tenant,
        "principal": a.principal,
        "kind": a.kind,
        "detail": a.detail,
    })
}

/// One event as a JSON object (hashes in hex), for the mirror and exports.
pub fn to_json(e: &AuditEvent) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq,
        "time_unix_ms": e.time_unix_ms,
        "tenant": e.tenant,
        "principal": e.principal,
        "role": e.role,
        "action": e.action,
        "record_ids": e.record_ids,
        "fields": e.fields,
        "purpose": e.purpose,
        "outcome": e.outcome,
        "peer": e.peer,
        "prev_hash": hex::encode(&e.prev_hash),
        "hash": hex::encode(&e.hash),
    })
}
