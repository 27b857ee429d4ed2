//! What pruning keeps of the events it drops: each record's latest write
//! (Put or Delete), so that scrub can still tell a record rolled back to an
//! older stored copy once the write that replaced it has left the trail.
//!
//! One entry per record, in the key-value store: the key a keyed hash of
//! tenant and id, the value (which names the record too, so that scrub can
//! walk what the trail says exists) sealed under the trail's frame key
//! with the key as associated data. Written only when pruning; a later
//! write of the same record in the kept trail always wins over it.
//!
//! Entries are not chained: someone who can write the store can delete
//! one (the record it names then escapes scrub's walk once its write has
//! left the kept trail) or put back an older authentic one. The threat
//! model says so.

use prost::Message;

use super::{LatestWrite, log};
use crate::pb::AuditEvent;
use crate::{
    crypto::{self, Context},
    error::{Error, Result},
    store::{Batch, Space, Storage, StorageError},
};

#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(bool, tag = "2")]
    deleted: bool,
    #[prost(string, optional, tag = "3")]
    version: Option<String>,
    #[prost(string, optional, tag = "4")]
    write_id: Option<String>,
    /// The record's tenant and id (empty in entries kept before scrub
    /// walked them).
    #[prost(string, tag = "5")]
    tenant: String,
    #[prost(string, tag = "6")]
    id: String,
}

fn key(keys: &log::Keys, tenant: &str, id: &str) -> Vec<u8> {
    let c = Context::new("coffre/audit-retained/v2")
        .with(tenant.as_bytes())
        .with(id.as_bytes());
    crypto::hmac_sha256(keys.chain(), c.as_bytes())[..16].to_vec()
}

/// Keeps the latest write of each record `view` holds, unless a later one
/// is kept already.
/// The latest write of each record a segment due for pruning holds, keyed
/// as kept aside. Reads the segment's frames (blocking file reads).
pub type Latest = std::collections::HashMap<Vec<u8>, Entry>;

/// Notes in `latest` the writes among `events` (oldest first): a later
/// write of a record replaces an earlier one.
pub fn note_latest(keys: &log::Keys, events: &[AuditEvent], latest: &mut Latest) {
    for e in events {
        let Some(w) = LatestWrite::of(e) else {
            continue;
        };
        for id in &e.record_ids {
            latest.insert(
                key(keys, &e.tenant, id),
                Entry {
                    seq: w.seq,
                    deleted: w.deleted,
                    version: w.version.clone(),
                    write_id: w.write_id.clone(),
                    tenant: e.tenant.clone(),
                    id: id.clone(),
                },
            );
        }
    }
}

pub fn collect_latest_writes(
    keys: &log::Keys,
    view: &log::SegView,
) -> Result<Latest, StorageError> {
    let mut latest: std::collections::HashMap<Vec<u8>, Entry> = Default::default();
    let mut failed = false;
    let start = view.marks()[0];
    view.frames(start, |frame, prev| {
        let Some(events) = frame.open(keys, prev) else {
            failed = true;
            return false;
        };
        note_latest(keys, &events, &mut latest);
        true
    })?;
    if failed {
        return Err(StorageError::Corrupt(
            "an audit frame due for pruning fails authentication",
        ));
    }
    Ok(latest)
}

/// Keeps `latest` aside, durably, unless a later write of a record is kept
/// already.
pub async fn keep_latest_writes(
    store: &Storage,
    keys: &log::Keys,
    latest: Latest,
) -> Result<(), StorageError> {
    let mut batch = Batch::new();
    for (k, e) in latest {
        if let Some(old) = read(store, keys, &k).await?
            && old.seq > e.seq
        {
            continue;
        }
        let sealed = keys.aead().seal(&k, &e.encode_to_vec());
        batch.put(Space::TrailRetained, k, sealed);
        if batch.0.len() >= 512 {
            store.apply(std::mem::take(&mut batch)).await?;
        }
    }
    store.apply(batch).await?;
    store.sync().await
}

async fn read(store: &Storage, keys: &log::Keys, k: &[u8]) -> Result<Option<Entry>, StorageError> {
    let Some(v) = store.get(Space::TrailRetained, k).await? else {
        return Ok(None);
    };
    let plain = keys
        .aead()
        .open(k, &v)
        .map_err(|_| StorageError::Corrupt("a retained write fails authentication"))?;
    Entry::decode(&plain[..])
        .map(Some)
        .map_err(|_| StorageError::Corrupt("a retained write does not decode"))
}

/// The latest write of `tenant`'s record `id` that pruning kept aside.
pub async fn lookup(
    store: &Storage,
    keys: &log::Keys,
    tenant: &str,
    id: &str,
) -> Result<Option<LatestWrite>> {
    let e = read(store, keys, &key(keys, tenant, id))
        .await
        .map_err(Error::from)?;
    Ok(e.map(|e| LatestWrite {
        seq: e.seq,
        deleted: e.deleted,
        version: e.version,
        write_id: e.write_id,
    }))
}

/// Every kept-aside write that names its record: `(tenant, id, write)`;
/// and how many entries name none (kept by an earlier release).
pub async fn all(
    store: &Storage,
    keys: &log::Keys,
) -> Result<(Vec<(String, String, LatestWrite)>, u64)> {
    let mut out = Vec::new();
    let mut unnamed = 0;
    let mut from = Vec::new();
    loop {
        let page = store
            .scan_from(Space::TrailRetained, b"", &from, 1024)
            .await
            .map_err(Error::from)?;
        let Some((last, _)) = page.last() else { break };
        from = last.clone();
        from.push(0);
        let n = page.len();
        for (k, v) in page {
            let plain = keys.aead().open(&k, &v).map_err(|_| Error::DataLoss)?;
            let e = Entry::decode(&plain[..]).map_err(|_| Error::DataLoss)?;
            if e.tenant.is_empty() || e.id.is_empty() {
                unnamed += 1;
                continue;
            }
            out.push((
                e.tenant,
                e.id,
                LatestWrite {
                    seq: e.seq,
                    deleted: e.deleted,
                    version: e.version,
                    write_id: e.write_id,
                },
            ));
        }
        if n < 1024 {
            break;
        }
    }
    Ok((out, unnamed))
}
