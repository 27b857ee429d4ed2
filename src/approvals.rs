//! The two-person rule: an action in `approval.required_for` (shredding a
//! tenant, retiring a key version, resetting someone's second factor,
//! granting an export, creating or unlocking an admin) runs only after a
//! second admin approved it.
//!
//! The first call is refused with an approval id; another admin approves
//! (or denies) it; the requester then repeats the same call with the same
//! arguments, which spends the approval and runs once. Approvals expire
//! `approval.ttl_minutes` after the request. Each step is an alert.
//!
//! Its threat is one rogue or stolen admin account: an admin created less
//! than `approval.min_approver_age_minutes` before a request cannot approve
//! it (a puppet made for the purpose is useless, and its creation alert
//! has time to be read), and one admin has at most
//! `approval.max_pending_per_requester` requests pending.
//!
//! Approvals live in `Meta` (backed up, shared by nodes); every change of
//! one is conditional on what was read, so two nodes cannot both spend it.
//! A requester's live (pending or approved) requests are also listed under
//! its name, so a guarded call reads those only, never the whole history.

use std::sync::Arc;

use prost::Message;

use crate::{
    accounts::Caller,
    audit::{Audit, Severity},
    clock::now_ms,
    error::{Error, Result},
    store::{Batch, Space, Storage, StorageError},
};

const PREFIX: &[u8] = b"approval\0";
/// `approval-live\0<requester>\0<id>`: the requester's pending or approved
/// requests (an entry outlives its request's end until the next look).
const LIVE_PREFIX: &[u8] = b"approval-live\0";
/// `ListApprovals` answers this many without a limit, at most `MAX_PAGE`.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Decided, used or expired approvals are listed this long, then dropped.
const KEPT_MS: i64 = 30 * 24 * 3600 * 1000;
const RETRIES: usize = 16;

tokio::task_local! {
    /// The approval the current call spent, for its audit event: the gate
    /// opens the scope around each call, [`Approvals::check`] fills it.
    pub static SPENT: std::cell::RefCell<Option<String>>;
}

/// An approval as `ListApprovals` shows it.
#[derive(Clone, PartialEq, Message)]
pub struct Approval {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub action: String,
    #[prost(string, tag = "3")]
    pub target: String,
    #[prost(string, tag = "4")]
    pub requested_by: String,
    #[prost(int64, tag = "5")]
    pub requested_ms: i64,
    #[prost(int64, tag = "6")]
    pub expires_ms: i64,
    /// `pending`, `approved`, `denied`, `used` (`expired` is computed).
    #[prost(string, tag = "7")]
    pub state: String,
    #[prost(string, tag = "8")]
    pub decided_by: String,
}

impl Approval {
    /// The principal the request acts on (`tenant/username`), if any.
    pub fn subject(&self) -> Option<String> {
        Some(format!(
            "{}/{}",
            self.target_field("tenant")?,
            self.target_field("username")?
        ))
    }

    /// `<key>=<value>` of the target (`tenant=T version=N`): the value.
    pub fn target_field(&self, key: &str) -> Option<&str> {
        self.target
            .split(' ')
            .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
    }

    /// The state as of `now` (a pending or approved one past its time is
    /// `expired`).
    pub fn state_at(&self, now: i64) -> &str {
        match self.state.as_str() {
            "pending" | "approved" if now >= self.expires_ms => "expired",
            s => s,
        }
    }
}

pub struct Approvals {
    store: Storage,
    audit: Arc<Audit>,
    required: Vec<String>,
    ttl_ms: i64,
    min_approver_age_ms: i64,
    max_pending: usize,
    /// Orders this node's changes; other nodes' are caught by conditions.
    writes: tokio::sync::Mutex<()>,
}

fn key(id: &str) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn live_prefix(requester: &str) -> Vec<u8> {
    let mut k = LIVE_PREFIX.to_vec();
    k.extend_from_slice(requester.as_bytes());
    k.push(0);
    k
}

fn live_key(requester: &str, id: &str) -> Vec<u8> {
    let mut k = live_prefix(requester);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Which approvals `ListApprovals` asks for.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// `pending`, `approved`, `denied`, `used`, `expired`, or any.
    pub state: Option<String>,
    pub limit: usize,
    /// Only those requested before this one (the last of the page before).
    pub before_id: Option<String>,
}

/// The states a request can be listed in.
pub const STATES: &[&str] = &["pending", "approved", "denied", "used", "expired"];

/// What the rule needs to know of the admin deciding.
pub struct Approver<'a> {
    pub caller: &'a Caller,
    /// When its principal was created.
    pub created_ms: i64,
}

impl Approvals {
    pub fn new(
        store: Storage,
        audit: Arc<Audit>,
        required: Vec<String>,
        ttl_minutes: f64,
        min_approver_age_minutes: f64,
        max_pending: u32,
    ) -> Self {
        Self {
            store,
            audit,
            required,
            ttl_ms: (ttl_minutes * 60_000.0) as i64,
            min_approver_age_ms: (min_approver_age_minutes * 60_000.0) as i64,
            max_pending: max_pending as usize,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether `action` needs a second admin.
    pub fn required(&self, action: &str) -> bool {
        self.required.iter().any(|a| a == action)
    }

    /// Lets `caller` run `action` on `target` if a second admin approved
    /// exactly that (the approval is spent, and returned); otherwise
    /// answers [`Error::ApprovalRequired`] with the id of a pending request
    /// (made now, or the one already waiting). `Ok(None)`: the action
    /// needs no second admin here.
    pub async fn check(
        &self,
        action: &str,
        target: &str,
        caller: &Caller,
    ) -> Result<Option<Approval>> {
        if !self.required(action) {
            return Ok(None);
        }
        let me = caller.principal();
        let mine = live_prefix(&me);
        let _w = self.writes.lock().await;
        for _ in 0..RETRIES {
            let now = now_ms();
            let mut waiting = None;
            let mut spend = None;
            let mut pending = 0;
            let mut ended = Batch::new();
            for (live, _) in self
                .store
                .scan_prefix(Space::Meta, &mine, usize::MAX)
                .await?
            {
                let id = String::from_utf8_lossy(&live[mine.len()..]).into_owned();
                let k = key(&id);
                let Some(raw) = self.store.get(Space::Meta, &k).await? else {
                    ended.delete(Space::Meta, live);
                    continue;
                };
                let a = Approval::decode(&raw[..])?;
                let state = a.state_at(now);
                if !matches!(state, "pending" | "approved") {
                    ended.delete(Space::Meta, live);
                    continue;
                }
                if state == "pending" {
                    pending += 1;
                }
                if a.action != action || a.target != target || a.requested_by != me {
                    continue;
                }
                match state {
                    "approved" => spend = Some((k, raw, a)),
                    _ => waiting = Some(a.id),
                }
            }
            if !ended.is_empty() {
                self.store.apply(ended).await?;
            }
            if let Some((k, raw, mut a)) = spend {
                a.state = "used".into();
                let mut b = Batch::new();
                b.expect(Space::Meta, k.clone(), Some(raw));
                b.put(Space::Meta, k, a.encode_to_vec());
                b.delete(Space::Meta, live_key(&me, &a.id));
                match self.store.commit(b).await {
                    Ok(()) => {
                        self.alert(
                            &a,
                            "used",
                            format!(
                                "{} on {} by {} under approval {} of {}",
                                a.action, a.target, a.requested_by, a.id, a.decided_by
                            ),
                        )
                        .await?;
                        let _ = SPENT.try_with(|s| *s.borrow_mut() = Some(a.id.clone()));
                        return Ok(Some(a));
                    }
                    Err(StorageError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(id) = waiting {
                return Err(Error::ApprovalRequired(id));
            }
            if pending >= self.max_pending {
                return Err(Error::FailedPrecondition(format!(
                    "{pending} requests of yours are pending already (approval.max_pending_per_requester): wait for a decision, or withdraw one (coffre approvals deny ID)"
                )));
            }
            let a = Approval {
                // Time first: ids sort as the requests were made.
                id: format!(
                    "ap-{:012x}{}",
                    now.max(0),
                    hex::encode(crate::crypto::random_array::<4>())
                ),
                action: action.into(),
                target: target.into(),
                requested_by: me.clone(),
                requested_ms: now,
                expires_ms: now + self.ttl_ms,
                state: "pending".into(),
                decided_by: String::new(),
            };
            let mut b = Batch::new();
            b.expect(Space::Meta, key(&a.id), None);
            b.put(Space::Meta, key(&a.id), a.encode_to_vec());
            b.put(Space::Meta, live_key(&me, &a.id), Vec::new());
            match self.store.commit(b).await {
                Ok(()) => {}
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
            self.alert(
                &a,
                "requested",
                format!(
                    "{} on {} requested by {}; a second admin runs: coffre approvals approve {}",
                    a.action, a.target, a.requested_by, a.id
                ),
            )
            .await?;
            return Err(Error::ApprovalRequired(a.id));
        }
        Err(Error::Unavailable(StorageError::Busy(
            "approvals changed under too many concurrent writes",
        )))
    }

    /// Approves (`yes`) or denies request `id` as `by`. Nobody approves
    /// their own request, nor one acting on themselves (a reset of their
    /// own second factor), nor one made less than
    /// `approval.min_approver_age_minutes` after they were created; anyone
    /// may deny (withdraw) one.
    pub async fn decide(&self, id: &str, by: Approver<'_>, yes: bool) -> Result<Approval> {
        let me = by.caller.principal();
        let _w = self.writes.lock().await;
        for _ in 0..RETRIES {
            let k = key(id);
            let Some(raw) = self.store.get(Space::Meta, &k).await? else {
                return Err(Error::NotFound);
            };
            let mut a = Approval::decode(&raw[..])?;
            if yes && a.requested_by == me {
                return Err(Error::PermissionDenied(
                    "approving one's own request is not allowed: another admin must",
                ));
            }
            if yes && a.subject().as_deref() == Some(me.as_str()) {
                return Err(Error::PermissionDenied(
                    "the principal a request acts on cannot approve it: another admin must",
                ));
            }
            if yes && by.created_ms.saturating_add(self.min_approver_age_ms) > a.requested_ms {
                return Err(Error::PermissionDenied(
                    "an admin created less than approval.min_approver_age_minutes before a request cannot approve it: another admin must",
                ));
            }
            match a.state_at(now_ms()) {
                "pending" => {}
                s => {
                    return Err(Error::FailedPrecondition(format!(
                        "approval {id} is {s}, not pending"
                    )));
                }
            }
            a.state = if yes { "approved" } else { "denied" }.into();
            a.decided_by = me.clone();
            let mut b = Batch::new();
            b.expect(Space::Meta, k.clone(), Some(raw));
            b.put(Space::Meta, k, a.encode_to_vec());
            if !yes {
                b.delete(Space::Meta, live_key(&a.requested_by, &a.id));
            }
            match self.store.commit(b).await {
                Ok(()) => {}
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
            let (kind, verb) = if yes {
                ("granted", "approved")
            } else {
                ("denied", "denied")
            };
            self.alert(
                &a,
                kind,
                format!(
                    "{} on {} requested by {}: {verb} by {me}",
                    a.action, a.target, a.requested_by
                ),
            )
            .await?;
            return Ok(a);
        }
        Err(Error::Unavailable(StorageError::Busy(
            "an approval changed under too many concurrent writes",
        )))
    }

    /// Voids the approvals `principal` granted that are not spent yet (it
    /// was locked: a suspect's word no longer counts). Returns how many.
    pub async fn void_granted_by(&self, principal: &str) -> Result<usize> {
        let _w = self.writes.lock().await;
        let now = now_ms();
        let mut voided = 0;
        for (k, raw) in self
            .store
            .scan_prefix(Space::Meta, PREFIX, usize::MAX)
            .await?
        {
            let mut a = Approval::decode(&raw[..])?;
            if a.decided_by != principal || a.state_at(now) != "approved" {
                continue;
            }
            a.state = "denied".into();
            let mut b = Batch::new();
            b.expect(Space::Meta, k.clone(), Some(raw));
            b.put(Space::Meta, k, a.encode_to_vec());
            b.delete(Space::Meta, live_key(&a.requested_by, &a.id));
            match self.store.commit(b).await {
                Ok(()) => {}
                // Spent meanwhile: nothing left to void.
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
            voided += 1;
            self.alert(
                &a,
                "denied",
                format!(
                    "{} on {} requested by {}: approval of {principal} voided, its approver was locked",
                    a.action, a.target, a.requested_by
                ),
            )
            .await?;
        }
        Ok(voided)
    }

    /// One page of the approvals of the last 30 days in state `q.state`
    /// (any without one), newest first, requested before `q.before_id`;
    /// older ones are dropped.
    pub async fn list(&self, q: &ListQuery) -> Result<Vec<Approval>> {
        if let Some(s) = &q.state
            && !STATES.contains(&s.as_str())
        {
            return Err(Error::InvalidArgument(format!(
                "state must be one of {}",
                STATES.join(", ")
            )));
        }
        let limit = match q.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let before = match &q.before_id {
            None => None,
            Some(id) => {
                let raw = self
                    .store
                    .get(Space::Meta, &key(id))
                    .await?
                    .ok_or_else(|| {
                        Error::InvalidArgument("before_id names no approval kept".into())
                    })?;
                let a = Approval::decode(&raw[..])?;
                Some((a.requested_ms, a.id))
            }
        };
        let now = now_ms();
        let mut out = Vec::new();
        let mut old = Batch::new();
        for (k, raw) in self
            .store
            .scan_prefix(Space::Meta, PREFIX, usize::MAX)
            .await?
        {
            let a = Approval::decode(&raw[..])?;
            if now - a.expires_ms > KEPT_MS {
                old.delete(Space::Meta, k);
                continue;
            }
            if q.state.as_deref().is_some_and(|s| s != a.state_at(now)) {
                continue;
            }
            if before
                .as_ref()
                .is_some_and(|(ms, id)| (a.requested_ms, &a.id) >= (*ms, id))
            {
                continue;
            }
            out.push(a);
        }
        if !old.is_empty() {
            self.store.apply(old).await?;
        }
        out.sort_by(|a, b| (b.requested_ms, &b.id).cmp(&(a.requested_ms, &a.id)));
        out.truncate(limit);
        Ok(out)
    }

    /// Alerts `approval_<step>` and counts the step.
    async fn alert(&self, a: &Approval, step: &'static str, detail: String) -> Result<()> {
        self.audit.stats().approval(step);
        let kind = format!("approval_{step}");
        let tenant = a.target_field("tenant").unwrap_or("");
        self.audit
            .alert(Severity::Warning, &kind, tenant, &a.requested_by, detail)
            .await
    }
}
