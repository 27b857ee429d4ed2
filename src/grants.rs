//! Export grants: the honest bulk read. An admin (with a second admin's
//! approval) lets one principal read up to `max_records` records beyond
//! its budget, with one stated purpose, for a few hours.
//!
//! A reading call with exactly the grant's purpose reserves, in one
//! conditional write, all the records it asks for, or is refused
//! (RESOURCE_EXHAUSTED) when fewer are left; its reads then spend the
//! reservation instead of the budget. Every other call keeps the budget.
//! Reserved records a call did not read (missing ids, a client gone) are
//! not given back: the bound errs on the side of fewer reads.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use prost::Message;

use crate::{
    accounts::Caller,
    audit::{Audit, Severity},
    clock::now_ms,
    error::{Error, Result},
    model::{Purpose, TenantName, Username},
    store::{Batch, Space, Storage, StorageError},
};

const PREFIX: &[u8] = b"grant\0";
/// First of the `fields` of a read's audit event when the read spent an
/// export grant (budgets rebuilt from the trail leave it out).
pub const GRANT_MARK: &str = "grant=export";
const RETRIES: usize = 64;
/// The longest window a grant may open.
pub const MAX_HOURS: u32 = 24 * 30;
/// The most records one grant may allow.
pub const MAX_RECORDS: u32 = 10_000_000;

#[derive(Clone, PartialEq, Message)]
struct StoredGrant {
    #[prost(string, tag = "1")]
    purpose: String,
    #[prost(uint32, tag = "2")]
    max_records: u32,
    #[prost(uint32, tag = "3")]
    used: u32,
    #[prost(int64, tag = "4")]
    expires_ms: i64,
    #[prost(string, tag = "5")]
    granted_by: String,
}

/// Records of a grant reserved by one call.
#[derive(Debug)]
pub struct Reservation {
    left: AtomicU32,
}

impl Reservation {
    /// Takes one record of the reservation, if one is left.
    pub fn take(&self) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

pub struct Grants {
    store: Storage,
    audit: Arc<Audit>,
    writes: tokio::sync::Mutex<()>,
    /// Principals found without a grant, and when: for [`NO_GRANT_TTL`]
    /// their reads skip the lookup (a storage round trip on PostgreSQL).
    /// A grant given on this node clears its entry at once; one given on
    /// another node is seen within the TTL (until then the budget applies,
    /// which errs on the safe side).
    none: parking_lot::Mutex<std::collections::HashMap<Vec<u8>, std::time::Instant>>,
}

const NO_GRANT_TTL: std::time::Duration = std::time::Duration::from_secs(2);
const NO_GRANT_TRACKED: usize = 100_000;

/// The bounds of a grant's size and window, checked before anyone is
/// asked to approve it.
pub fn check_bounds(max_records: u32, hours: u32) -> Result<()> {
    if max_records == 0 || max_records > MAX_RECORDS {
        return Err(Error::InvalidArgument(format!(
            "max_records must be 1 to {MAX_RECORDS}"
        )));
    }
    if hours == 0 || hours > MAX_HOURS {
        return Err(Error::InvalidArgument(format!(
            "hours must be 1 to {MAX_HOURS}"
        )));
    }
    Ok(())
}

fn key(tenant: &TenantName, username: &Username) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend_from_slice(tenant.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(username.as_str().as_bytes());
    k
}

impl Grants {
    pub fn new(store: Storage, audit: Arc<Audit>) -> Self {
        Self {
            store,
            audit,
            writes: tokio::sync::Mutex::new(()),
            none: Default::default(),
        }
    }

    /// Forgets a shredded tenant's grants.
    pub async fn forget_tenant(&self, tenant: &TenantName) -> Result<()> {
        let mut prefix = PREFIX.to_vec();
        prefix.extend_from_slice(tenant.as_str().as_bytes());
        prefix.push(0);
        let mut b = Batch::new();
        for (k, _) in self
            .store
            .scan_prefix(Space::Meta, &prefix, usize::MAX)
            .await?
        {
            b.delete(Space::Meta, k);
        }
        Ok(self.store.apply_each(b).await?)
    }

    /// Opens a grant (replacing any earlier one of that principal).
    pub async fn grant(
        &self,
        tenant: &TenantName,
        username: &Username,
        max_records: u32,
        purpose: &Purpose,
        hours: u32,
        by: &Caller,
    ) -> Result<()> {
        check_bounds(max_records, hours)?;
        let g = StoredGrant {
            purpose: purpose.as_str().into(),
            max_records,
            used: 0,
            expires_ms: now_ms() + i64::from(hours) * 3_600_000,
            granted_by: by.principal(),
        };
        let _w = self.writes.lock().await;
        let k = key(tenant, username);
        let mut b = Batch::new();
        b.put(Space::Meta, k.clone(), g.encode_to_vec());
        self.store.commit(b).await?;
        self.none.lock().remove(&k);
        self.audit
            .alert(
                Severity::Warning,
                "export_granted",
                tenant.as_str(),
                &format!("{tenant}/{username}"),
                format!(
                    "export grant: up to {max_records} records beyond the budget, purpose {:?}, for {hours} h, granted by {}",
                    purpose.as_str(),
                    g.granted_by
                ),
            )
            .await
    }

    /// For a reading call of `caller` with `purpose` that may read up to
    /// `wanted` records: `None` when no live grant has that purpose (the
    /// budget applies), else a reservation of `wanted` records of the
    /// grant — or RESOURCE_EXHAUSTED if fewer are left.
    pub async fn reserve(
        &self,
        caller: &Caller,
        purpose: &Purpose,
        wanted: u32,
    ) -> Result<Option<Reservation>> {
        if wanted == 0 || purpose.as_str().is_empty() {
            return Ok(None);
        }
        let k = key(&caller.tenant, &caller.username);
        if self
            .none
            .lock()
            .get(&k)
            .is_some_and(|t| t.elapsed() < NO_GRANT_TTL)
        {
            return Ok(None);
        }
        let Some(raw) = self.store.get(Space::Meta, &k).await? else {
            let mut none = self.none.lock();
            if none.len() >= NO_GRANT_TRACKED {
                none.clear();
            }
            none.insert(k, std::time::Instant::now());
            return Ok(None);
        };
        let g = StoredGrant::decode(&raw[..])?;
        if g.purpose != purpose.as_str() || now_ms() >= g.expires_ms {
            return Ok(None);
        }
        let _w = self.writes.lock().await;
        let mut raw = Some(raw);
        for _ in 0..RETRIES {
            let current = match raw.take() {
                Some(r) => r,
                None => match self.store.get(Space::Meta, &k).await? {
                    Some(r) => r,
                    None => return Ok(None),
                },
            };
            let mut g = StoredGrant::decode(&current[..])?;
            if g.purpose != purpose.as_str() || now_ms() >= g.expires_ms {
                return Ok(None);
            }
            // All or nothing: a call is audited with every id it asks
            // for, so it runs only if the grant covers them all.
            let left = g.max_records - g.used.min(g.max_records);
            if left < wanted {
                return Err(Error::OverBudget {
                    limit: "export grant: fewer records left than this call asks for",
                    retry_after_ms: 0,
                });
            }
            let n = wanted;
            let first = g.used == 0;
            g.used += n;
            let mut b = Batch::new();
            b.expect(Space::Meta, k.clone(), Some(current));
            b.put(Space::Meta, k.clone(), g.encode_to_vec());
            match self.store.commit(b).await {
                Ok(()) => {}
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
            self.audit.stats().export_grant_records.inc_by(u64::from(n));
            if first || g.used == g.max_records {
                let what = if first { "first use" } else { "used up" };
                self.audit
                    .alert(
                        Severity::Warning,
                        "export_grant_used",
                        caller.tenant.as_str(),
                        &caller.principal(),
                        format!(
                            "export grant {what}: {} of {} records read or reserved, purpose {:?}",
                            g.used, g.max_records, g.purpose
                        ),
                    )
                    .await?;
            }
            return Ok(Some(Reservation {
                left: AtomicU32::new(n),
            }));
        }
        Err(Error::Unavailable(StorageError::Busy(
            "an export grant changed under too many concurrent reads",
        )))
    }
}
