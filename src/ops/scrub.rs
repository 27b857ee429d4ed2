//! Scrub, online: every stored record of every tenant checked whole (its
//! MAC, every field decrypted and authenticated) and against the last
//! write the audit trail holds of it (a record put back from an older copy
//! of the data seals correctly but is not the latest write); then the
//! other way round, every record the trail says exists (its latest write a
//! Put) looked for in the store, so that a record deleted behind the
//! vault's back is found too. Paced like a key job, so that reads keep
//! their latency; failures are alerts.

use crate::{
    audit::Severity,
    error::{Error, Result},
    model::RecordId,
    vault::{TrailCheck, Vault},
};

/// Records checked per step (as a key job's step: ~1 ms of work).
const STEP: usize = 16;
/// Failed ids named in a tenant's alert, at most.
const NAMED_FAILURES: usize = 100;

/// Progress of one tenant, or (empty `tenant`) the whole scrub's total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubCount {
    pub tenant: String,
    pub checked: u64,
    pub total: u64,
    pub failed: u64,
}

/// Scrubs every tenant, reporting each one's progress after each step;
/// returns each tenant's final count and the total. Failures (authentication, a rollback against the
/// trail) raise one critical alert per tenant naming up to 100 record ids.
pub async fn scrub(
    vault: &Vault,
    mut progress: impl FnMut(ScrubCount),
) -> Result<(Vec<ScrubCount>, ScrubCount)> {
    let mut all = ScrubCount::default();
    let mut tenants = Vec::new();
    // What the trail says exists, by tenant (read first: a record written
    // after this walk is simply not looked for).
    let mut written: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (t, id) in vault.audit.records_written().await?.records {
        written.entry(t).or_default().push(id);
    }
    for name in vault.tenants.names().await? {
        let expected = written.remove(name.as_str()).unwrap_or_default();
        let tenant = match vault.tenants.get(&name).await {
            Ok(t) => t,
            // Shredded: nothing of it is readable, nothing to check.
            Err(Error::NotFound) => continue,
            Err(e) => return Err(e),
        };
        let mut c = ScrubCount {
            tenant: name.to_string(),
            total: vault.records.count(&tenant).await?,
            ..Default::default()
        };
        let (mut damaged, mut rolled_back, mut missing) = (0u64, 0u64, 0u64);
        let mut named: Vec<RecordId> = Vec::new();
        let mut cursor = Vec::new();
        progress(c.clone());
        loop {
            let started = std::time::Instant::now();
            let (ok, failed, next) = vault.records.scrub_step(&tenant, &cursor, STEP).await?;
            c.checked += (ok.len() + failed.len()) as u64;
            damaged += failed.len() as u64;
            named.extend(
                failed
                    .into_iter()
                    .take(NAMED_FAILURES - named.len().min(NAMED_FAILURES)),
            );
            for (id, stamp) in ok {
                let mut check = vault.compare_with_trail(&tenant, &id, Some(stamp)).await;
                if let Ok(TrailCheck::RolledBack) = check {
                    // Rare: confirmed on a fresh read, since a write may
                    // have replaced the record after the step read it.
                    check = vault.check_against_trail(&tenant, &id).await;
                }
                match check {
                    Ok(TrailCheck::Matches | TrailCheck::NoWriteInTrail) => {}
                    // Deleted since the step read it: nothing to compare.
                    Ok(TrailCheck::Missing) => {}
                    Ok(TrailCheck::RolledBack) => {
                        rolled_back += 1;
                        if named.len() < NAMED_FAILURES {
                            named.push(id);
                        }
                    }
                    // Replaced since the step, and the new copy fails.
                    Err(Error::DataLoss) => {
                        damaged += 1;
                        if named.len() < NAMED_FAILURES {
                            named.push(id);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            c.failed = damaged + rolled_back;
            c.total = c.total.max(c.checked);
            progress(c.clone());
            let Some(n) = next else { break };
            cursor = n;
            tokio::time::sleep(started.elapsed().max(std::time::Duration::from_millis(1))).await;
        }
        for ids in expected.chunks(STEP * 4) {
            let started = std::time::Instant::now();
            for id in ids {
                // An id the trail holds but the model refuses names no
                // record that could be stored.
                let Ok(id) = RecordId::parse(id) else {
                    continue;
                };
                if vault.records.stamp(&tenant, &id).await?.is_some() {
                    continue;
                }
                // Confirmed against a fresh read of the trail: a delete may
                // have come after the walk.
                if let TrailCheck::Missing = vault.check_against_trail(&tenant, &id).await? {
                    missing += 1;
                    if named.len() < NAMED_FAILURES {
                        named.push(id);
                    }
                }
            }
            c.failed = damaged + rolled_back + missing;
            progress(c.clone());
            tokio::time::sleep(started.elapsed().max(std::time::Duration::from_millis(1))).await;
        }
        if c.failed > 0 {
            alert_failed(
                vault,
                &c.tenant,
                named.iter().map(|i| i.to_string()).collect(),
                format!(
                    "scrub: {} records fail ({} stored were checked): {damaged} authentication, {rolled_back} rolled back against the trail, {missing} missing although the trail's last write stored them",
                    c.failed, c.checked
                ),
            )
            .await?;
        }
        all.checked += c.checked;
        all.total += c.total;
        all.failed += c.failed;
        tenants.push(c);
    }
    // Tenants the trail wrote to whose entry is gone although they were
    // never shredded: every record it says they hold is missing.
    for (name, ids) in written {
        if vault.keys.is_shredded(&name) || ids.is_empty() {
            continue;
        }
        let c = ScrubCount {
            tenant: name.clone(),
            failed: ids.len() as u64,
            ..Default::default()
        };
        progress(c.clone());
        alert_failed(
            vault,
            &name,
            ids.iter().take(NAMED_FAILURES).cloned().collect(),
            format!(
                "scrub: tenant {name} is gone from the store although never shredded; the trail says it holds {} records",
                ids.len()
            ),
        )
        .await?;
        all.failed += c.failed;
        tenants.push(c);
    }
    Ok((tenants, all))
}

/// The critical alert of a tenant's failures, naming up to
/// [`NAMED_FAILURES`] records.
async fn alert_failed(
    vault: &Vault,
    tenant: &str,
    record_ids: Vec<String>,
    purpose: String,
) -> Result<()> {
    vault
        .audit
        .alert_event(
            Severity::Critical,
            "scrub_failed",
            crate::pb::AuditEvent {
                tenant: tenant.to_string(),
                principal: "system/coffre".into(),
                record_ids,
                purpose,
                ..Default::default()
            },
        )
        .await?;
    Ok(())
}
