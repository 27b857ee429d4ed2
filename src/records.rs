//! Records: every field sealed on its own under the tenant's active data
//! key, bound to tenant, record id and field name; a blind index (HMAC of a
//! normalised value) for the tenant's indexed fields; Argon2id secrets that
//! are never readable back.
//!
//! A replace is read-modify-write under a per-id stripe lock (held only for
//! the in-memory part), then waits for a group-committed flush.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{Hash, Hasher as _},
    sync::Arc,
};

use prost::Message;
use rand::seq::IndexedRandom;
use unicode_normalization::UnicodeNormalization;
use zeroize::Zeroizing;

use crate::{
    accounts::Hasher,
    crypto::Context,
    error::{Error, Result},
    keys::{Keyring, TenantKeys},
    model::{FieldName, Fields, MAX_VALUE_BYTES, Password, RecordId},
    store::{Batch, Space, Storage},
    tenants::Tenant,
};

/// The record format written now: a record is sealed as a whole (see
/// [`record_mac_input`]). Format 1 (fields sealed one by one only) is
/// migrated in place when the vault opens.
pub const RECORD_FORMAT: u32 = 2;

/// Ids returned by one FindRecords call at most.
pub const MAX_FIND_RESULTS: usize = 1000;
const STRIPES: usize = 256;

#[derive(Clone, PartialEq, Message)]
struct StoredRecord {
    #[prost(uint64, tag = "1")]
    version: u64,
    /// Field name → sealed value.
    #[prost(map = "string, bytes", tag = "2")]
    fields: HashMap<String, Vec<u8>>,
    /// Indexed field name → blind-index token, to drop old entries on replace.
    #[prost(map = "string, bytes", tag = "3")]
    index: HashMap<String, Vec<u8>>,
    /// [`RECORD_FORMAT`]; 0 in records written before formats.
    #[prost(uint32, tag = "4")]
    format: u32,
    /// Random per write and kept by rewraps: names this write of the
    /// record in its audit event, so that `scrub` can tell an older copy
    /// put back from the latest write, even one with the same version.
    #[prost(bytes = "vec", tag = "5")]
    write_id: Vec<u8>,
    /// The tenant's record key's MAC over [`record_mac_input`].
    #[prost(bytes = "vec", tag = "6")]
    mac: Vec<u8>,
}

/// What of a sealed field the record MAC covers: its header (format and key
/// version), nonce and tag, which commit to the ciphertext under its key.
fn field_commitment(sealed: &[u8]) -> Vec<u8> {
    const HEAD: usize = 5 + 12;
    const TAG: usize = 16;
    if sealed.len() < HEAD + TAG {
        return sealed.to_vec();
    }
    [&sealed[..HEAD], &sealed[sealed.len() - TAG..]].concat()
}

/// The bytes a record's MAC covers: tenant, id, version, format, write id,
/// and the names and commitments of all its fields in name order. A field
/// dropped or added, a version edited, a write id swapped: another MAC.
fn record_mac_input(tenant: &str, id: &str, rec: &StoredRecord) -> Vec<u8> {
    let mut c = Context::new("coffre/record/v2");
    c.push(tenant.as_bytes())
        .push(id.as_bytes())
        .push(&rec.version.to_be_bytes())
        .push(&rec.format.to_be_bytes())
        .push(&rec.write_id)
        .push(&(rec.fields.len() as u64).to_be_bytes());
    let mut names: Vec<&String> = rec.fields.keys().collect();
    names.sort();
    for name in names {
        c.push(name.as_bytes())
            .push(&field_commitment(&rec.fields[name]));
    }
    c.as_bytes().to_vec()
}

/// Seals `rec` as a whole, in the current format.
fn seal_record(tenant: &Tenant, id: &str, rec: &mut StoredRecord) -> Result<()> {
    rec.format = RECORD_FORMAT;
    let mac = tenant
        .keys
        .record_mac(&record_mac_input(tenant.name.as_str(), id, rec))?;
    rec.mac = mac.to_vec();
    Ok(())
}

/// Checks that `rec` is the record as last sealed: DATA_LOSS otherwise,
/// before any field is decrypted or rewritten.
fn check_record(tenant: &Tenant, id: &str, rec: &StoredRecord) -> Result<()> {
    check_record_with(tenant.name.as_str(), &tenant.keys, id, rec)
}

fn check_record_with(tenant: &str, keys: &TenantKeys, id: &str, rec: &StoredRecord) -> Result<()> {
    if rec.format != RECORD_FORMAT {
        return Err(Error::DataLoss);
    }
    let mac = keys.record_mac(&record_mac_input(tenant, id, rec))?;
    if !crate::crypto::ct_eq(&mac, &rec.mac) {
        return Err(Error::DataLoss);
    }
    Ok(())
}

/// A record's version and write id: what its audit event names.
fn stamp_of(rec: &StoredRecord) -> Result<(u64, [u8; 16])> {
    let w: [u8; 16] = rec
        .write_id
        .as_slice()
        .try_into()
        .map_err(|_| Error::DataLoss)?;
    Ok((rec.version, w))
}

/// Where a stored record's key splits: its tenant and id.
pub fn split_record_key(key: &[u8]) -> Option<(&str, &str)> {
    let at = key.iter().position(|b| *b == 0)?;
    Some((
        std::str::from_utf8(&key[..at]).ok()?,
        std::str::from_utf8(&key[at + 1..]).ok()?,
    ))
}

/// Checks a stored record as `scrub` and `backup verify` do: sealed as a
/// whole under the tenant's record key, and every field opens under its
/// data key (the plaintext is dropped, zeroized, at once). Returns its
/// field count; DATA_LOSS on any failure.
pub fn check_stored(tenant: &str, keys: &TenantKeys, id: &str, bytes: &[u8]) -> Result<usize> {
    let rec = StoredRecord::decode(bytes).map_err(|_| Error::DataLoss)?;
    check_record_with(tenant, keys, id, &rec)?;
    for (name, sealed) in &rec.fields {
        keys.decrypt_field(id, name, sealed)
            .map_err(|_| Error::DataLoss)?;
    }
    Ok(rec.fields.len())
}

/// What one [`Records::rewrap_step`] did (applied, not yet durable).
#[derive(Debug)]
pub struct RewrapStep {
    /// Fields re-encrypted.
    pub fields: u64,
    /// Where the next step starts; `None` when the tenant is done.
    pub cursor: Option<Vec<u8>>,
    /// The step took the data key to its bound: this version became active.
    pub rotated_to: Option<u32>,
}

/// Whether any field of `rec` is sealed under another version than `active`.
fn stale_fields(rec: &StoredRecord, active: u32) -> Result<bool> {
    for sealed in rec.fields.values() {
        if crate::crypto::field_key_version(sealed)? != active {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What a durable put did.
#[derive(Debug)]
pub struct Written {
    pub id: RecordId,
    pub version: u64,
    /// Names this write (see `StoredRecord::write_id`), for its audit event.
    pub write_id: [u8; 16],
    /// The write took the tenant's data key to its encryption bound, and
    /// this version became active first.
    pub rotated_to: Option<u32>,
}

/// A stored record not yet decrypted ([`Records::fetch`]).
#[derive(PartialEq)]
pub struct Sealed {
    id: RecordId,
    rec: StoredRecord,
}

impl Sealed {
    /// Decrypts the fields asked for (all of them if `projection` is empty).
    /// `tenant` must be the one the record was fetched from: the fields'
    /// associated data names it, so any other fails as DATA_LOSS.
    pub fn open(&self, tenant: &Tenant, projection: &[FieldName]) -> Result<PlainRecord> {
        check_record(tenant, self.id.as_str(), &self.rec)?;
        let mut fields = BTreeMap::new();
        let mut open = |name: &str, sealed: &[u8]| -> Result<()> {
            let mut plain = tenant.keys.decrypt_field(self.id.as_str(), name, sealed)?;
            // Moves the bytes (no copy left behind); on failure `plain`
            // still holds them and zeroizes.
            let text = String::from_utf8(std::mem::take(&mut *plain)).map_err(|e| {
                *plain = e.into_bytes();
                Error::DataLoss
            })?;
            fields.insert(name.to_string(), Zeroizing::new(text));
            Ok(())
        };
        if projection.is_empty() {
            for (name, sealed) in &self.rec.fields {
                open(name, sealed)?;
            }
        } else {
            for name in projection {
                if let Some(sealed) = self.rec.fields.get(name.as_str()) {
                    open(name.as_str(), sealed)?;
                }
            }
        }
        Ok(PlainRecord {
            id: self.id.clone(),
            version: self.rec.version,
            fields,
        })
    }
}

/// A decrypted record. Values zeroize on drop; `Debug` shows names only.
pub struct PlainRecord {
    pub id: RecordId,
    pub version: u64,
    pub fields: BTreeMap<String, Zeroizing<String>>,
}

impl std::fmt::Debug for PlainRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainRecord")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

pub struct Records {
    store: Storage,
    keys: Arc<Keyring>,
    hasher: Arc<Hasher>,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

fn record_key(tenant: &Tenant, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.name.as_str().len() + id.len() + 1);
    k.extend_from_slice(tenant.name.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn index_prefix(tenant: &Tenant, field: &str, token: &[u8]) -> Vec<u8> {
    let mut k = record_key(tenant, field);
    k.push(0);
    k.extend_from_slice(token);
    k
}

fn index_key(tenant: &Tenant, field: &str, token: &[u8], id: &RecordId) -> Vec<u8> {
    let mut k = index_prefix(tenant, field, token);
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

fn secret_key(tenant: &Tenant, id: &RecordId, name: &str) -> Vec<u8> {
    let mut k = record_key(tenant, id.as_str());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

fn secret_context(tenant: &Tenant, id: &RecordId, name: &FieldName) -> Vec<u8> {
    Context::new("coffre/secret/v1")
        .with(tenant.name.as_str().as_bytes())
        .with(id.as_str().as_bytes())
        .with(name.as_str().as_bytes())
        .as_bytes()
        .to_vec()
}

/// What the blind index compares: trimmed, Unicode NFC, case-folded.
pub fn normalize(value: &str) -> Zeroizing<String> {
    let nfc = Zeroizing::new(value.trim().nfc().collect::<String>());
    let folded = Zeroizing::new(caseless::default_case_fold_str(&nfc));
    Zeroizing::new(folded.nfc().collect())
}

impl Records {
    pub fn new(store: Storage, keys: Arc<Keyring>, hasher: Arc<Hasher>) -> Self {
        Self {
            store,
            keys,
            hasher,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    fn stripe(&self, tenant: &Tenant, id: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        tenant.name.hash(&mut h);
        id.hash(&mut h);
        &self.stripes[(h.finish() as usize) % STRIPES]
    }

    /// A stored record with the bytes it was read from, for a write that
    /// must find them unchanged ([`Batch::expect`]) when other nodes write
    /// the same store.
    async fn load_raw(&self, tenant: &Tenant, id: &str) -> Result<Option<(Vec<u8>, StoredRecord)>> {
        match self
            .store
            .get(Space::Records, &record_key(tenant, id))
            .await?
        {
            Some(b) => {
                let rec = StoredRecord::decode(&b[..])?;
                Ok(Some((b, rec)))
            }
            None => Ok(None),
        }
    }

    /// Makes `b` apply only if the record still holds `raw`, where other
    /// nodes write too.
    fn expect_record(&self, b: &mut Batch, key: &[u8], raw: Vec<u8>) {
        if self.store.is_shared() {
            b.expect(Space::Records, key.to_vec(), Some(raw));
        }
    }

    async fn load(&self, tenant: &Tenant, id: &str) -> Result<Option<StoredRecord>> {
        Ok(self
            .store
            .get(Space::Records, &record_key(tenant, id))
            .await?
            .map(|b| StoredRecord::decode(&b[..]))
            .transpose()?)
    }

    /// Creates or replaces a record; returns its id and new version once the
    /// write is durable.
    pub async fn put(
        &self,
        tenant: &Tenant,
        id: Option<RecordId>,
        fields: Fields,
    ) -> Result<Written> {
        self.put_with(tenant, id, fields, &BTreeSet::new()).await
    }

    /// [`Records::put`], with the indexed fields in `decoys` indexed under a
    /// random token that no search can produce (honeytokens' common values).
    pub(crate) async fn put_with(
        &self,
        tenant: &Tenant,
        id: Option<RecordId>,
        fields: Fields,
        decoys: &BTreeSet<FieldName>,
    ) -> Result<Written> {
        let id = id.unwrap_or_else(RecordId::generate);
        // Lock order, here and in rewrap: the tenant's write guard, then
        // the stripe.
        let write_id = crate::crypto::random_array::<16>();
        let (version, rotated) = {
            let _writing = tenant.keys.write_guard().await;
            let (active, rotated) = self
                .keys
                .reserve_encryptions(&tenant.keys, fields.0.len() as u64)
                .await?;
            let mut rec = StoredRecord {
                version: 0,
                fields: HashMap::with_capacity(fields.0.len()),
                index: HashMap::new(),
                format: RECORD_FORMAT,
                write_id: write_id.to_vec(),
                mac: Vec::new(),
            };
            for (name, value) in &fields.0 {
                rec.fields.insert(
                    name.to_string(),
                    tenant.keys.encrypt_field(
                        &active,
                        id.as_str(),
                        name.as_str(),
                        value.as_bytes(),
                    ),
                );
                if tenant.indexed.contains(name) {
                    let token = if decoys.contains(name) {
                        crate::crypto::random_array::<32>()
                    } else {
                        tenant.keys.index_token(name.as_str(), &normalize(value))
                    };
                    rec.index.insert(name.to_string(), token.to_vec());
                }
            }
            let key = record_key(tenant, id.as_str());
            let version = {
                let _g = self.stripe(tenant, id.as_str()).lock().await;
                // The stripe orders this process's writers of the record;
                // other nodes' are caught by the condition, and the
                // version is taken again from what they wrote: every
                // acknowledged write has its own, greater version.
                let mut tries = 0;
                loop {
                    let raw = self.store.get(Space::Records, &key).await?;
                    let old = match &raw {
                        Some(bytes) => Some(StoredRecord::decode(&bytes[..])?),
                        None => None,
                    };
                    let mut b = Batch::new();
                    if self.store.is_shared() {
                        b.expect(Space::Records, key.clone(), raw);
                    }
                    if let Some(old) = &old {
                        for (f, token) in &old.index {
                            b.delete(Space::Index, index_key(tenant, f, token, &id));
                        }
                    }
                    for (f, token) in &rec.index {
                        b.put(Space::Index, index_key(tenant, f, token, &id), Vec::new());
                    }
                    rec.version = old.map_or(1, |o| o.version + 1);
                    seal_record(tenant, id.as_str(), &mut rec)?;
                    b.put(Space::Records, key.clone(), rec.encode_to_vec());
                    match self.store.apply(b).await {
                        Ok(()) => break rec.version,
                        Err(crate::store::StorageError::Conflict) if tries < 64 => tries += 1,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            (version, rotated)
        };
        self.store.sync().await?;
        Ok(Written {
            id,
            version,
            write_id,
            rotated_to: rotated,
        })
    }

    /// The field names of a record of the tenant, picked at random among
    /// the first few, with their plaintext lengths; `None` when the tenant
    /// has no record yet.
    pub async fn sample_shape(&self, tenant: &Tenant) -> Result<Option<Vec<(FieldName, usize)>>> {
        let mut prefix = tenant.name.as_str().as_bytes().to_vec();
        prefix.push(0);
        let some = self.store.scan_prefix(Space::Records, &prefix, 64).await?;
        let Some((_, bytes)) = some.choose(&mut rand::rng()) else {
            return Ok(None);
        };
        let rec = StoredRecord::decode(&bytes[..])?;
        let mut shape = rec
            .fields
            .iter()
            .map(|(name, sealed)| {
                Ok((
                    FieldName::parse(name).map_err(|_| Error::DataLoss)?,
                    crate::crypto::field_plaintext_len(sealed).ok_or(Error::DataLoss)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        shape.sort();
        Ok(Some(shape))
    }

    /// Re-encrypts, under the active data key, every field of up to `max`
    /// records after `cursor` (a record key; empty: from the start) that an
    /// older version seals. Each record is rewritten under its stripe lock
    /// from a fresh read, so a concurrent replace is never lost; its
    /// version number stays (the content has not changed).
    pub async fn rewrap_step(
        &self,
        tenant: &Tenant,
        cursor: &[u8],
        max: usize,
    ) -> Result<RewrapStep> {
        let mut prefix = tenant.name.as_str().as_bytes().to_vec();
        prefix.push(0);
        let start = if cursor.is_empty() {
            prefix.clone()
        } else {
            let mut s = cursor.to_vec();
            s.push(0);
            s
        };
        let entries = self
            .store
            .scan_from(Space::Records, &prefix, &start, max)
            .await?;
        let mut step = RewrapStep {
            fields: 0,
            cursor: entries.last().map(|(k, _)| k.clone()),
            rotated_to: None,
        };
        if entries.len() < max {
            step.cursor = None;
        }
        for (key, bytes) in &entries {
            let active = tenant.keys.active_version();
            if !stale_fields(&StoredRecord::decode(&bytes[..])?, active)? {
                continue;
            }
            let id = std::str::from_utf8(&key[prefix.len()..]).map_err(|_| Error::DataLoss)?;
            let _writing = tenant.keys.write_guard().await;
            let _g = self.stripe(tenant, id).lock().await;
            // Again from the top when another node wrote the record first.
            for attempt in 0.. {
                let Some((raw, mut rec)) = self.load_raw(tenant, id).await? else {
                    break;
                };
                // Never re-seal a record that was tampered with.
                check_record(tenant, id, &rec)?;
                let mut stale = Vec::new();
                for (name, sealed) in &rec.fields {
                    if crate::crypto::field_key_version(sealed)? != active {
                        stale.push(name.clone());
                    }
                }
                if stale.is_empty() {
                    break;
                }
                let (key_now, rotated) = self
                    .keys
                    .reserve_encryptions(&tenant.keys, stale.len() as u64)
                    .await?;
                step.rotated_to = step.rotated_to.or(rotated);
                for name in &stale {
                    let sealed = &rec.fields[name];
                    let plain = tenant.keys.decrypt_field(id, name, sealed)?;
                    let again = tenant.keys.encrypt_field(&key_now, id, name, &plain);
                    rec.fields.insert(name.clone(), again);
                }
                seal_record(tenant, id, &mut rec)?;
                let mut b = Batch::new();
                self.expect_record(&mut b, key, raw);
                b.put(Space::Records, key.clone(), rec.encode_to_vec());
                match self.store.apply(b).await {
                    Ok(()) => {
                        step.fields += stale.len() as u64;
                        break;
                    }
                    Err(crate::store::StorageError::Conflict) if attempt < 64 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(step)
    }

    /// Moves the index entries of up to `max` records after `cursor` to
    /// the index key that is rotating in: each record's indexed fields are
    /// decrypted, their tokens computed under the next key, and the record
    /// and its entries rewritten together, under the record's lock from a
    /// fresh read. Returns the records done and where to go on (`None`:
    /// finished).
    pub async fn reindex_step(
        &self,
        tenant: &Tenant,
        cursor: &[u8],
        max: usize,
    ) -> Result<(u64, Option<Vec<u8>>)> {
        let (prefix, entries, next) = self.step_of(tenant, cursor, max).await?;
        let mut done = 0;
        for (key, _) in &entries {
            let id = std::str::from_utf8(&key[prefix.len()..]).map_err(|_| Error::DataLoss)?;
            let rid = RecordId::parse(id).map_err(|_| Error::DataLoss)?;
            let _writing = tenant.keys.write_guard().await;
            let _g = self.stripe(tenant, id).lock().await;
            for attempt in 0.. {
                let Some((raw, mut rec)) = self.load_raw(tenant, id).await? else {
                    break;
                };
                check_record(tenant, id, &rec)?;
                let mut b = Batch::new();
                self.expect_record(&mut b, key, raw);
                for (f, token) in &rec.index {
                    b.delete(Space::Index, index_key(tenant, f, token, &rid));
                }
                let mut index = HashMap::new();
                for (f, old) in &rec.index {
                    let sealed = rec.fields.get(f).ok_or(Error::DataLoss)?;
                    let plain = tenant.keys.decrypt_field(id, f, sealed)?;
                    let text = std::str::from_utf8(&plain).map_err(|_| Error::DataLoss)?;
                    let norm = normalize(text);
                    // A token that matches the value under neither key is a
                    // honeytoken's decoy: it stays random.
                    let genuine = tenant
                        .keys
                        .search_tokens(f, &norm)
                        .iter()
                        .any(|t| crate::crypto::ct_eq(t, old));
                    let token = if genuine {
                        tenant.keys.index_token(f, &norm).to_vec()
                    } else {
                        crate::crypto::random_array::<32>().to_vec()
                    };
                    b.put(Space::Index, index_key(tenant, f, &token, &rid), Vec::new());
                    index.insert(f.clone(), token);
                }
                rec.index = index;
                b.put(Space::Records, key.clone(), rec.encode_to_vec());
                match self.store.apply(b).await {
                    Ok(()) => {
                        done += 1;
                        break;
                    }
                    Err(crate::store::StorageError::Conflict) if attempt < 64 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok((done, next))
    }

    /// The tenant's key prefix, the stored records of one step of a
    /// tenant-wide job (up to `max` after the record key `cursor`; empty:
    /// from the start), and where the next step starts (`None`: the end).
    #[allow(clippy::type_complexity)]
    async fn step_of(
        &self,
        tenant: &Tenant,
        cursor: &[u8],
        max: usize,
    ) -> Result<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>)> {
        let mut prefix = tenant.name.as_str().as_bytes().to_vec();
        prefix.push(0);
        let start = if cursor.is_empty() {
            prefix.clone()
        } else {
            [cursor, &[0]].concat()
        };
        let entries = self
            .store
            .scan_from(Space::Records, &prefix, &start, max)
            .await?;
        let next = (entries.len() == max)
            .then(|| entries.last().map(|(k, _)| k.clone()))
            .flatten();
        Ok((prefix, entries, next))
    }

    /// Seals as a whole, in the current format, up to `max` records after
    /// `cursor` that are still in format 1 (a data directory from before
    /// records were sealed whole). Each record is rewritten atomically under
    /// its lock, so a step killed half-way leaves records of both formats,
    /// and the next run goes on. Returns the records sealed and where to go
    /// on (`None`: finished).
    pub async fn migrate_step(
        &self,
        tenant: &Tenant,
        cursor: &[u8],
        max: usize,
    ) -> Result<(u64, Option<Vec<u8>>)> {
        let (prefix, entries, next) = self.step_of(tenant, cursor, max).await?;
        let mut done = 0;
        for (key, _) in &entries {
            let id = std::str::from_utf8(&key[prefix.len()..]).map_err(|_| Error::DataLoss)?;
            let _g = self.stripe(tenant, id).lock().await;
            let Some(mut rec) = self.load(tenant, id).await? else {
                continue;
            };
            if rec.format == RECORD_FORMAT {
                continue;
            }
            rec.write_id = crate::crypto::random_array::<16>().to_vec();
            seal_record(tenant, id, &mut rec)?;
            let mut b = Batch::new();
            b.put(Space::Records, key.clone(), rec.encode_to_vec());
            self.store.apply(b).await?;
            done += 1;
        }
        Ok((done, next))
    }

    /// A stored record's version and write id, after checking it is sealed
    /// as a whole (what `scrub` compares with the trail's last write).
    pub async fn stamp(&self, tenant: &Tenant, id: &RecordId) -> Result<Option<(u64, [u8; 16])>> {
        let Some(rec) = self.load(tenant, id.as_str()).await? else {
            return Ok(None);
        };
        check_record(tenant, id.as_str(), &rec)?;
        Ok(Some(stamp_of(&rec)?))
    }

    /// How many records the tenant has (a scan, a chunk at a time).
    pub async fn count(&self, tenant: &Tenant) -> Result<u64> {
        let mut prefix = tenant.name.as_str().as_bytes().to_vec();
        prefix.push(0);
        Ok(self.store.count(Space::Records, &prefix).await?)
    }

    /// How many stored fields of the tenant each key version seals (a scan
    /// of the tenant's records a chunk at a time; nothing is decrypted).
    pub async fn key_usage(&self, tenant: &Tenant) -> Result<BTreeMap<u32, u64>> {
        let mut prefix = tenant.name.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut usage = BTreeMap::new();
        let mut bad = None;
        self.store
            .scan_each(Space::Records, &prefix, |_, bytes| {
                let versions = StoredRecord::decode(bytes)
                    .map_err(Error::from)
                    .and_then(|rec| {
                        rec.fields
                            .values()
                            .map(|s| Ok(crate::crypto::field_key_version(s)?))
                            .collect::<Result<Vec<u32>>>()
                    });
                match versions {
                    Ok(vs) => {
                        for v in vs {
                            *usage.entry(v).or_insert(0) += 1;
                        }
                        true
                    }
                    Err(e) => {
                        bad = Some(e);
                        false
                    }
                }
            })
            .await?;
        match bad {
            Some(e) => Err(e),
            None => Ok(usage),
        }
    }

    /// One step of a scrub: up to `max` records after the record key
    /// `cursor` (empty: from the start), each checked whole
    /// ([`check_stored`]); those that pass with their stamp (version, write
    /// id), the ids that fail, and where the next step starts (`None`: the
    /// end).
    #[allow(clippy::type_complexity)]
    pub async fn scrub_step(
        &self,
        tenant: &Tenant,
        cursor: &[u8],
        max: usize,
    ) -> Result<(
        Vec<(RecordId, (u64, [u8; 16]))>,
        Vec<RecordId>,
        Option<Vec<u8>>,
    )> {
        let (_, entries, next) = self.step_of(tenant, cursor, max).await?;
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for (key, bytes) in entries {
            let Some((_, id)) = split_record_key(&key) else {
                continue;
            };
            let Ok(id) = RecordId::parse(id) else {
                continue;
            };
            let checked = check_stored(tenant.name.as_str(), &tenant.keys, id.as_str(), &bytes)
                .and_then(|_| stamp_of(&StoredRecord::decode(&bytes[..])?));
            match checked {
                Ok(stamp) => ok.push((id, stamp)),
                Err(_) => failed.push(id),
            }
        }
        Ok((ok, failed, next))
    }

    /// A record as stored, still sealed: a reader can learn that it exists
    /// (and spend budget on it) before anything is decrypted, with one
    /// lookup for both.
    pub async fn fetch(&self, tenant: &Tenant, id: &RecordId) -> Result<Option<Sealed>> {
        Ok(self.load(tenant, id.as_str()).await?.map(|rec| Sealed {
            id: id.clone(),
            rec,
        }))
    }

    /// Decrypts the fields asked for (all of them if `projection` is empty).
    pub async fn get(
        &self,
        tenant: &Tenant,
        id: &RecordId,
        projection: &[FieldName],
    ) -> Result<PlainRecord> {
        self.fetch(tenant, id)
            .await?
            .ok_or(Error::NotFound)?
            .open(tenant, projection)
    }
    /// Deletes a record with its index entries and secrets.
    pub async fn delete(&self, tenant: &Tenant, id: &RecordId) -> Result<()> {
        {
            let _g = self.stripe(tenant, id.as_str()).lock().await;
            let (raw, old) = self
                .load_raw(tenant, id.as_str())
                .await?
                .ok_or(Error::NotFound)?;
            let mut b = Batch::new();
            // A write on another node in between: this delete loses the
            // race (the client sees the conflict as UNAVAILABLE and may
            // retry) rather than leave that write's index behind.
            self.expect_record(&mut b, &record_key(tenant, id.as_str()), raw);
            for (f, token) in &old.index {
                b.delete(Space::Index, index_key(tenant, f, token, id));
            }
            let mut sp = record_key(tenant, id.as_str());
            sp.push(0);
            for (k, _) in self
                .store
                .scan_prefix(Space::Secrets, &sp, usize::MAX)
                .await?
            {
                b.delete(Space::Secrets, k);
            }
            b.delete(Space::Records, record_key(tenant, id.as_str()));
            self.store.apply(b).await?;
        }
        Ok(self.store.sync().await?)
    }

    /// Ids of the records whose indexed `field` equals `value` (normalised).
    pub async fn find(
        &self,
        tenant: &Tenant,
        field: &FieldName,
        value: &str,
    ) -> Result<Vec<RecordId>> {
        if !tenant.indexed.contains(field) {
            return Err(Error::InvalidArgument(format!(
                "field {field} is not indexed for this tenant"
            )));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(Error::InvalidArgument("values are at most 64 KiB".into()));
        }
        let mut ids = BTreeSet::new();
        // Two tokens while the index key rotates: records not yet rebuilt
        // are under the current key, newer ones under the next.
        for token in tenant.keys.search_tokens(field.as_str(), &normalize(value)) {
            let prefix = index_prefix(tenant, field.as_str(), &token);
            for (k, _) in self
                .store
                .scan_prefix(Space::Index, &prefix, MAX_FIND_RESULTS)
                .await?
            {
                let id = std::str::from_utf8(&k[prefix.len()..])
                    .ok()
                    .and_then(|s| RecordId::parse(s).ok())
                    .ok_or(Error::DataLoss)?;
                ids.insert(id);
            }
        }
        Ok(ids.into_iter().take(MAX_FIND_RESULTS).collect())
    }

    /// Stores an Argon2id hash of `secret` on an existing record.
    pub async fn set_secret(
        &self,
        tenant: &Tenant,
        id: &RecordId,
        name: &FieldName,
        secret: String,
    ) -> Result<()> {
        if secret.is_empty() {
            return Err(Error::InvalidArgument("secret must not be empty".into()));
        }
        let secret = Password::candidate(secret)?;
        if self.load(tenant, id.as_str()).await?.is_none() {
            return Err(Error::NotFound);
        }
        let phc = self
            .hasher
            .hash(&secret, &secret_context(tenant, id, name))
            .await?;
        let mut b = Batch::new();
        b.put(
            Space::Secrets,
            secret_key(tenant, id, name.as_str()),
            phc.into_bytes(),
        );
        Ok(self.store.commit(b).await?)
    }

    /// Whether `candidate` matches; NOT_FOUND only when no such secret.
    pub async fn verify_secret(
        &self,
        tenant: &Tenant,
        id: &RecordId,
        name: &FieldName,
        candidate: String,
    ) -> Result<bool> {
        let candidate = Password::candidate(candidate)?;
        let phc = self
            .store
            .get(Space::Secrets, &secret_key(tenant, id, name.as_str()))
            .await?
            .ok_or(Error::NotFound)?;
        let phc = String::from_utf8(phc).map_err(|_| Error::DataLoss)?;
        self.hasher
            .verify(Some(&phc), &candidate, &secret_context(tenant, id, name))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_folds_case_space_and_composition() {
        assert_eq!(&*normalize("  DUPONT "), "dupont");
        // Precomposed "é" and "E" + combining acute compare equal.
        assert_eq!(
            &*normalize("Ren\u{e9}"),
            &*normalize("REN E\u{301}".replace(' ', "").as_str())
        );
        assert_eq!(&*normalize("Stra\u{df}e"), "strasse");
        assert_ne!(&*normalize("dupont"), &*normalize("dupond"));
    }
}
