//! Format 1 → 2: the trail used to be one key-value entry per event in the
//! store (clear protobuf, `Space::Audit`, a MAC'd base in `Space::Meta`).
//! At the first open of such a data directory the events are checked
//! against their chain, written into a new log beside the target
//! (`audit.migrating`), which is moved into place once durable; only then
//! are the old entries deleted. A crash at any step leaves either the old
//! trail whole (and the migration runs again) or the new one whole (and
//! the leftovers are deleted).

use std::path::Path;

use prost::Message;

use super::{GENESIS, log};
use crate::{
    crypto::{self, Context},
    error::{Error, Result},
    pb::AuditEvent,
    store::{Batch, Space, Storage, StorageError},
};

/// Format 1's base after pruning: `seq ‖ prev_hash ‖ MAC`.
const BASE_KEY: &[u8] = b"audit_base";

async fn base(store: &Storage, keys: &log::Keys) -> Result<(u64, [u8; 32])> {
    let Some(v) = store.get(Space::Meta, BASE_KEY).await? else {
        return Ok((1, GENESIS));
    };
    if v.len() != 72 {
        return Err(Error::DataLoss);
    }
    let seq = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
    let prev: [u8; 32] = v[8..40].try_into().expect("32 bytes");
    let c = Context::new("coffre/audit-base/v1")
        .with(&seq.to_be_bytes())
        .with(&prev);
    if !crypto::ct_eq(&crypto::hmac_sha256(keys.chain(), c.as_bytes()), &v[40..]) {
        return Err(Error::DataLoss);
    }
    Ok((seq, prev))
}

fn refuse(seq: u64, why: &str) -> Error {
    Error::FailedPrecondition(format!(
        "the audit trail (format 1) fails verification at seq {seq} ({why}); it is not migrated: export it with the previous coffre version and ask for help"
    ))
}

/// Deletes format 1's entries (after the new trail is in place).
async fn delete_old(store: &Storage) -> Result<()> {
    loop {
        let rows = store.scan_prefix(Space::Audit, b"", 4096).await?;
        if rows.is_empty() {
            break;
        }
        let mut b = Batch::new();
        for (k, _) in rows {
            b.delete(Space::Audit, k);
        }
        store.apply(b).await?;
    }
    let mut b = Batch::new();
    b.delete(Space::Meta, BASE_KEY.to_vec());
    store.apply(b).await?;
    store.flush_blocking()?;
    Ok(())
}

/// Moves a format-1 trail into `dir`. Returns how many events moved.
pub async fn from_store(store: &Storage, keys: &log::Keys, dir: &Path) -> Result<u64> {
    let old_left = store.last(Space::Audit).await?.is_some();
    if log::Log::exists(dir) {
        if old_left {
            delete_old(store).await?;
        }
        return Ok(0);
    }
    if !old_left {
        return Ok(0);
    }
    let (base_seq, base_prev) = base(store, keys).await?;
    let staging = dir.with_extension("migrating");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| StorageError::Io(e.to_string()))?;
    }
    let keys2 = log::Keys::new(
        crate::crypto::SecretKey::from_slice(keys.chain().expose()).expect("32 bytes"),
    );
    let (new, _) = log::Log::open(&staging, keys2, (base_seq, base_prev))?;
    let mut prev = base_prev;
    let mut expect = base_seq;
    let mut start = Vec::new();
    let mut moved = 0u64;
    loop {
        let rows = store.scan_from(Space::Audit, b"", &start, 1024).await?;
        if rows.is_empty() {
            break;
        }
        let mut chunk = Vec::with_capacity(rows.len());
        for (k, v) in &rows {
            let e =
                AuditEvent::decode(&v[..]).map_err(|_| refuse(expect, "event does not decode"))?;
            if k.as_slice() != e.seq.to_be_bytes() || e.seq != expect {
                return Err(refuse(expect, "sequence gap or reordering"));
            }
            if e.prev_hash != prev {
                return Err(refuse(expect, "previous hash does not match"));
            }
            let h = log::chain_hash(keys.chain(), &prev, &e);
            if !crypto::ct_eq(&h, &e.hash) {
                return Err(refuse(expect, "event was modified"));
            }
            prev = h;
            expect += 1;
            chunk.push(e);
        }
        new.append(&chunk)?;
        moved += chunk.len() as u64;
        let mut next = rows.last().expect("not empty").0.clone();
        next.push(0);
        start = next;
    }
    drop(new);
    std::fs::rename(&staging, dir).map_err(|e| StorageError::Io(e.to_string()))?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::Io(e.to_string()))?;
    }
    delete_old(store).await?;
    tracing::info!(
        events = moved,
        "audit trail moved to format {}",
        log::TRAIL_FORMAT
    );
    Ok(moved)
}
