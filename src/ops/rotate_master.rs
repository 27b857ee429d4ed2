//! Master-key rotation, offline: every wrapped key re-wrapped under the new
//! master key (crash-safe, in `keys::rotate_master`), then an event in the
//! trail naming the operator.

use std::path::Path;

use super::OpsError;
use crate::{config::Config, pb, store::StorageError};

/// What a rotation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterRotated {
    /// This many keys now sit under the new master key.
    Rotated { keys: usize },
    /// An earlier run finished the job already.
    AlreadyDone,
}

/// Re-wraps every key of `config.data_dir` under the master key in
/// `new_key`. The server must be stopped (holding the store's lock proves
/// it). `operator` is who ran it, for the trail.
pub async fn rotate_master(
    config: &Config,
    new_key: &Path,
    operator: &str,
) -> Result<MasterRotated, OpsError> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    if same(new_key, &config.master_key_file) {
        return Err(OpsError::Refused(
            "--new-key is the current master key file: make a new one with `coffre keygen`".into(),
        ));
    }
    let old = crate::keys::load_key_file(&config.master_key_file)?;
    let new = crate::keys::load_key_file(new_key)?;
    if let (crate::config::StorageBackend::Postgres, Some(url)) =
        (&config.storage.backend, &config.storage.postgres_url)
    {
        let opts = crate::store::PostgresOptions {
            url: url.expose().to_string(),
            pool_size: 2,
        };
        return rotate_in_database(config, &opts, &old, &new, new_key, operator).await;
    }
    // Holding the store's lock proves no server is running on this directory.
    let held = crate::store::Storage::open_sled(
        &config.data_dir,
        &crate::store::SledOptions {
            cache_capacity_bytes: 1 << 20,
        },
    )
    .map_err(|e| match e {
        StorageError::Locked(_) => OpsError::Busy(e.to_string()),
        e => OpsError::Busy(format!("data_dir {}: {e}", config.data_dir.display())),
    })?;
    // The list first: a crash after the key store turned leaves the new
    // key its list, and the old list stays for the old key.
    follow_shred_list(config, &old, &new, new_key)?;
    let outcome = match crate::keys::rotate_master(&config.data_dir, &old, &new, None)? {
        crate::keys::MasterRotation::Rotated { keys } => MasterRotated::Rotated { keys },
        crate::keys::MasterRotation::AlreadyDone => MasterRotated::AlreadyDone,
    };
    // In the trail like every key operation: opened with the new key, the
    // audit key is the same as before, so the chain simply goes on.
    let ring = crate::keys::Keyring::open(
        held.clone(),
        crate::keys::KeyHome::in_dir(&config.data_dir),
        &new,
        u64::MAX,
    )
    .await?;
    let audit_key = crate::crypto::SecretKey::from_slice(ring.audit_key().expose())
        .expect("audit key is KEY_LEN bytes");
    let audit = crate::audit::Audit::open(
        held.clone(),
        audit_key,
        &config.data_dir,
        config.audit.mirror_file.as_deref(),
        config.alert_file.as_deref(),
    )
    .await?;
    record(&audit, outcome, operator).await?;
    Ok(outcome)
}

/// The shred list follows the key it sits beside (unless the config puts
/// it elsewhere): the new key's list holds every tenant of the old, under
/// a MAC of the new key. A list the config puts elsewhere is re-MACed in
/// place (a rerun finds it done).
fn follow_shred_list(
    config: &Config,
    old: &crate::keys::MasterKey,
    new: &crate::keys::MasterKey,
    new_key: &Path,
) -> Result<(), OpsError> {
    use crate::shredlist::{ShredList, ShredListError};
    let path = config.shred_list_path();
    let from_old = ShredList::load(&path, old.shred_list_key());
    if config.keys.shred_list_file.is_none() {
        from_old
            .and_then(|l| {
                l.rekeyed(
                    &crate::shredlist::default_path(new_key),
                    new.shred_list_key(),
                )
            })
            .map_err(crate::keys::KeyError::from)?;
        return Ok(());
    }
    match from_old {
        Ok(l) => {
            l.rekeyed(&path, new.shred_list_key())
                .map_err(crate::keys::KeyError::from)?;
        }
        // Re-MACed by an earlier run already: it checks under the new key.
        Err(ShredListError::Damaged(_)) => {
            ShredList::load(&path, new.shred_list_key()).map_err(crate::keys::KeyError::from)?;
        }
        Err(e) => return Err(crate::keys::KeyError::from(e).into()),
    }
    Ok(())
}

/// [`rotate_master`] of a vault on PostgreSQL: every node must be stopped
/// (no heartbeat in the last seconds), the key store row is re-wrapped in
/// one transaction, and the event goes to the shared trail.
async fn rotate_in_database(
    config: &Config,
    opts: &crate::store::PostgresOptions,
    old: &crate::keys::MasterKey,
    new: &crate::keys::MasterKey,
    new_key: &Path,
    operator: &str,
) -> Result<MasterRotated, OpsError> {
    let backend = std::sync::Arc::new(crate::store::PostgresBackend::open(opts).await?);
    let store = crate::store::Storage::new(backend).shared_with_other_nodes();
    let alive = crate::cluster::alive_nodes(&store).await?;
    if alive > 0 {
        return Err(OpsError::Busy(format!(
            "{alive} node(s) of this vault are running: stop the server first, every node (rotate-master is offline)"
        )));
    }
    let row = crate::store::postgres::KeyStoreRow::new(opts);
    follow_shred_list(config, old, new, new_key)?;
    let outcome = match crate::keys::rotate_master_row(&row, old, new)? {
        crate::keys::MasterRotation::Rotated { keys } => MasterRotated::Rotated { keys },
        crate::keys::MasterRotation::AlreadyDone => MasterRotated::AlreadyDone,
    };
    let ring = crate::keys::Keyring::open(
        store.clone(),
        crate::keys::KeyHome::Db(row, crate::store::PostgresBackend::pool(opts)?),
        new,
        u64::MAX,
    )
    .await?;
    let audit_key = crate::crypto::SecretKey::from_slice(ring.audit_key().expose())
        .expect("audit key is KEY_LEN bytes");
    let audit = crate::audit::Audit::open_postgres(
        opts,
        store,
        audit_key,
        config.audit.mirror_file.as_deref(),
        config.alert_file.as_deref(),
    )?;
    record(&audit, outcome, operator).await?;
    Ok(outcome)
}

/// The rotation's event.
async fn record(
    audit: &crate::audit::Audit,
    outcome: MasterRotated,
    operator: &str,
) -> Result<(), OpsError> {
    let keys = match outcome {
        MasterRotated::Rotated { keys } => keys,
        MasterRotated::AlreadyDone => 0,
    };
    audit
        .record(pb::AuditEvent {
            tenant: "system".into(),
            principal: format!("system/cli:{operator}"),
            role: "admin".into(),
            action: "keys/rotate_master".into(),
            purpose: format!("{keys} keys re-wrapped under a new master key"),
            outcome: "ok".into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}
