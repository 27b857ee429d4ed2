//! The key hierarchy.
//!
//! ```text
//! master key (key file, outside data_dir)
//!  ├─ HKDF "kek"        → wraps every stored key (AES-256-GCM, AAD names what it wraps)
//!  │    ├─ pepper        (random, for Argon2id; wrapped so a master rotation keeps it)
//!  │    └─ per tenant:   data key v1, v2, … (fields)  and  index key (blind index HMAC)
//!  ├─ HKDF "key-check"  → a stored MAC that tells a wrong master key at start-up
//!  └─ HKDF "audit"      → MACs the audit chain
//! ```
//!
//! Unwrapped keys live only in memory, in types that zeroize on drop and
//! print as `[redacted]`; a tenant's keys are unwrapped once and cached.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use base64::Engine;
use parking_lot::{Mutex, RwLock};
use zeroize::Zeroizing;

use crate::crypto::{self, Aead256, Context, CryptoError, FieldAad, SecretKey};
use crate::storage::{Batch, Space, Storage, StorageError};

const KEY_FILE_PREFIX: &str = "coffre-master-key-v1:";
const KEY_CHECK_LABEL: &[u8] = b"coffre key check v1";
/// Encryptions reserved per durable counter write. After a crash the count
/// resumes at the reservation, so it can only over-count, never under-count.
const COUNTER_BLOCK: u64 = 4096;

/// Why the master key or the key store could not be used. Messages name
/// paths and modes, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key file {0}: {1}")]
    File(String, String),
    #[error(
        "master key file {path} is accessible by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    Permissions { path: String, mode: u32 },
    #[error("master key file {0} is not a Coffre master key")]
    Malformed(String),
    #[error("the master key does not match this data directory (key-check value differs)")]
    WrongKey,
    #[error("a stored key failed authentication: the key store was modified or damaged")]
    Tampered,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The root of the hierarchy. Never stored inside `data_dir`.
#[derive(Debug)]
pub struct MasterKey(SecretKey);

/// Writes a new random master key to `path`, created 0600 and never over an
/// existing file.
pub fn generate_key_file(path: &Path) -> Result<(), KeyError> {
    let key = SecretKey::random();
    let text = Zeroizing::new(format!(
        "{KEY_FILE_PREFIX}{}\n",
        base64::engine::general_purpose::STANDARD.encode(key.expose())
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KeyError::File(path.display().to_string(), e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| KeyError::File(path.display().to_string(), e.to_string()))
}

/// Reads the master key, refusing a file that group or others can access.
pub fn load_key_file(path: &Path) -> Result<MasterKey, KeyError> {
    let shown = path.display().to_string();
    let meta = fs::metadata(path).map_err(|e| KeyError::File(shown.clone(), e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: shown, mode });
    }
    let text = Zeroizing::new(
        fs::read_to_string(path).map_err(|e| KeyError::File(shown.clone(), e.to_string()))?,
    );
    let b64 = text
        .trim()
        .strip_prefix(KEY_FILE_PREFIX)
        .ok_or_else(|| KeyError::Malformed(shown.clone()))?;
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| KeyError::Malformed(shown.clone()))?,
    );
    SecretKey::from_slice(&bytes)
        .map(MasterKey)
        .ok_or(KeyError::Malformed(shown))
}

impl MasterKey {
    pub fn from_secret(key: SecretKey) -> Self {
        Self(key)
    }
}

/// One tenant's unwrapped keys. Versions are added by rotation and removed
/// by retirement while the keys are shared, so they sit behind a lock; a
/// write takes the active version once ([`ActiveKey`]) for all its fields.
pub struct TenantKeys {
    tenant: String,
    versions: RwLock<Versions>,
    index: SecretKey,
    /// Held shared by every write from the choice of its key version until
    /// its ciphertexts are applied, and exclusively by a retirement, so no
    /// write can use a version as it is retired.
    writes: RwLock<()>,
}

struct Versions {
    active: u32,
    data: HashMap<u32, Arc<DataKey>>,
}

struct DataKey {
    aead: Aead256,
    counter: EncryptionCounter,
}

/// Encryptions performed under one key version, persisted in blocks.
struct EncryptionCounter {
    count: AtomicU64,
    reserved: Mutex<u64>,
}

/// The version one write encrypts under, with its encryptions counted.
pub struct ActiveKey {
    version: u32,
    key: Arc<DataKey>,
}

impl ActiveKey {
    pub fn version(&self) -> u32 {
        self.version
    }
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKeys")
            .field("tenant", &self.tenant)
            .field("active", &self.active_version())
            .finish_non_exhaustive()
    }
}

impl TenantKeys {
    pub fn active_version(&self) -> u32 {
        self.versions.read().active
    }

    /// Seals one field value under `active`, which
    /// [`Keyring::reserve_encryptions`] returned for this write.
    pub fn encrypt_field(
        &self,
        active: &ActiveKey,
        record_id: &str,
        field: &str,
        plaintext: &[u8],
    ) -> Vec<u8> {
        active.key.aead.seal_field(
            active.version,
            &mut field_aad(&self.tenant, record_id, field),
            plaintext,
        )
    }

    /// Opens a field; any failure (tampering, a field moved from another
    /// record or tenant, an unknown or retired key version) is an
    /// authentication error.
    pub fn decrypt_field(
        &self,
        record_id: &str,
        field: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let version = crypto::field_key_version(sealed)?;
        let key = self
            .versions
            .read()
            .data
            .get(&version)
            .cloned()
            .ok_or(CryptoError::Authentication)?;
        key.aead
            .open_field(&mut field_aad(&self.tenant, record_id, field), sealed)
    }

    /// The blind-index token of an already normalised value of `field`.
    pub fn index_token(&self, field: &str, normalized: &str) -> [u8; 32] {
        let ctx = Context::new("coffre/index/v1")
            .with(self.tenant.as_bytes())
            .with(field.as_bytes())
            .with(normalized.as_bytes());
        crypto::hmac_sha256(&self.index, ctx.as_bytes())
    }

    /// Held by a write while it encrypts and applies (see `writes`).
    pub fn write_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.writes.read()
    }

    /// Encryptions performed under each live version (for `KeyStatus`).
    pub fn encryption_counts(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<_> = self
            .versions
            .read()
            .data
            .iter()
            .map(|(ver, k)| (*ver, k.counter.count.load(Ordering::Relaxed)))
            .collect();
        v.sort_unstable();
        v
    }
}

fn field_aad(tenant: &str, record_id: &str, field: &str) -> FieldAad {
    FieldAad::new(
        "coffre/field/v1",
        &[tenant.as_bytes(), record_id.as_bytes(), field.as_bytes()],
    )
}

fn wrap_context(tenant: &str, kind: &str, version: u32) -> Context {
    Context::new("coffre/tenant-key/v1")
        .with(tenant.as_bytes())
        .with(kind.as_bytes())
        .with(&version.to_be_bytes())
}

fn tenant_key_id(tenant: &str, kind: &str, version: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + kind.len() + 6);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(kind.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn tenant_prefix(tenant: &str) -> Vec<u8> {
    let mut k = tenant.as_bytes().to_vec();
    k.push(0);
    k
}

/// The vault's keys: the wrapping key, the pepper, derived keys, and a cache
/// of unwrapped tenant keys.
pub struct Keyring {
    store: Storage,
    kek: Aead256,
    pepper: SecretKey,
    audit: SecretKey,
    /// A tenant data key version encrypts at most this many values.
    rotate_after: u64,
    /// Rotations one at a time.
    rotating: Mutex<()>,
    /// Names the records a principal read, in its stored read budget.
    budget: SecretKey,
    /// Marks honeytoken records without naming them in the clear.
    honeytoken: SecretKey,
    tenants: RwLock<HashMap<String, Arc<TenantKeys>>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring([redacted])")
    }
}

impl Keyring {
    /// Opens the key store with `master`. On an empty store, records the
    /// key-check value and a new pepper; otherwise refuses a different key.
    pub fn open(store: Storage, master: &MasterKey, rotate_after: u64) -> Result<Self, KeyError> {
        let check_key = crypto::derive_key(&master.0, "key-check");
        let check = crypto::hmac_sha256(&check_key, KEY_CHECK_LABEL);
        let kek = crypto::derive_key(&master.0, "kek").aead();
        let pepper_aad = Context::new("coffre/pepper/v1");
        let pepper = match store.get(Space::Meta, b"key_check")? {
            Some(stored) => {
                if !crypto::ct_eq(&stored, &check) {
                    return Err(KeyError::WrongKey);
                }
                let wrapped = store
                    .get(Space::Meta, b"pepper")?
                    .ok_or(KeyError::Tampered)?;
                let raw = kek
                    .open(pepper_aad.as_bytes(), &wrapped)
                    .map_err(|_| KeyError::Tampered)?;
                SecretKey::from_slice(&raw).ok_or(KeyError::Tampered)?
            }
            None => {
                let pepper = SecretKey::random();
                let mut b = Batch::new();
                b.put(Space::Meta, b"key_check".to_vec(), check.to_vec());
                b.put(
                    Space::Meta,
                    b"pepper".to_vec(),
                    kek.seal(pepper_aad.as_bytes(), pepper.expose()),
                );
                store.apply(b)?;
                store.flush_blocking()?;
                pepper
            }
        };
        Ok(Self {
            store,
            kek,
            pepper,
            audit: crypto::derive_key(&master.0, "audit"),
            rotate_after,
            rotating: Mutex::new(()),
            budget: crypto::derive_key(&master.0, "budget"),
            honeytoken: crypto::derive_key(&master.0, "honeytoken"),
            tenants: RwLock::new(HashMap::new()),
        })
    }

    /// The Argon2id pepper (a server-side secret mixed into every hash).
    pub fn pepper(&self) -> &SecretKey {
        &self.pepper
    }

    /// The key that MACs the audit chain.
    pub fn audit_key(&self) -> &SecretKey {
        &self.audit
    }

    /// The key that names records in stored read budgets.
    pub fn budget_key(&self) -> &SecretKey {
        &self.budget
    }

    /// The key that marks honeytoken records.
    pub fn honeytoken_key(&self) -> &SecretKey {
        &self.honeytoken
    }

    /// Adds a new tenant's wrapped keys (data key v1, index key) to `batch`.
    pub fn add_new_tenant(&self, tenant: &str, batch: &mut Batch) {
        let data = SecretKey::random();
        let index = SecretKey::random();
        batch.put(
            Space::Keys,
            tenant_key_id(tenant, "data", 1),
            self.kek
                .seal(wrap_context(tenant, "data", 1).as_bytes(), data.expose()),
        );
        batch.put(
            Space::Keys,
            tenant_key_id(tenant, "index", 0),
            self.kek
                .seal(wrap_context(tenant, "index", 0).as_bytes(), index.expose()),
        );
        batch.put(
            Space::Keys,
            tenant_key_id(tenant, "active", 0),
            1u32.to_be_bytes().to_vec(),
        );
    }

    /// The tenant's unwrapped keys, or `None` if it has none.
    pub fn tenant(&self, tenant: &str) -> Result<Option<Arc<TenantKeys>>, KeyError> {
        if let Some(k) = self.tenants.read().get(tenant) {
            return Ok(Some(k.clone()));
        }
        let Some(keys) = self.load_tenant(tenant)? else {
            return Ok(None);
        };
        let keys = Arc::new(keys);
        self.tenants
            .write()
            .entry(tenant.to_string())
            .or_insert(keys.clone());
        Ok(Some(keys))
    }

    fn load_tenant(&self, tenant: &str) -> Result<Option<TenantKeys>, KeyError> {
        let Some(active) = self
            .store
            .get(Space::Keys, &tenant_key_id(tenant, "active", 0))?
        else {
            return Ok(None);
        };
        let active = u32::from_be_bytes(active.try_into().map_err(|_| KeyError::Tampered)?);
        let index = self.unwrap_stored(tenant, "index", 0)?;
        let mut data = HashMap::new();
        let data_prefix = {
            let mut p = tenant_prefix(tenant);
            p.extend_from_slice(b"data\0");
            p
        };
        for (k, wrapped) in self.store.scan_prefix(Space::Keys, &data_prefix, 1 << 20)? {
            let version = u32::from_be_bytes(
                k[data_prefix.len()..]
                    .try_into()
                    .map_err(|_| KeyError::Tampered)?,
            );
            let key = self.unwrap(tenant, "data", version, &wrapped)?;
            let reserved = self
                .store
                .get(Space::Counters, &tenant_key_id(tenant, "data", version))?
                .map(|v| v.try_into().map(u64::from_be_bytes))
                .transpose()
                .map_err(|_| KeyError::Tampered)?
                .unwrap_or(0);
            data.insert(version, Arc::new(DataKey::new(key.aead(), reserved)));
        }
        if !data.contains_key(&active) {
            return Err(KeyError::Tampered);
        }
        Ok(Some(TenantKeys {
            tenant: tenant.to_string(),
            versions: RwLock::new(Versions { active, data }),
            index,
            writes: RwLock::new(()),
        }))
    }

    fn unwrap_stored(&self, tenant: &str, kind: &str, version: u32) -> Result<SecretKey, KeyError> {
        let wrapped = self
            .store
            .get(Space::Keys, &tenant_key_id(tenant, kind, version))?
            .ok_or(KeyError::Tampered)?;
        self.unwrap(tenant, kind, version, &wrapped)
    }

    fn unwrap(
        &self,
        tenant: &str,
        kind: &str,
        version: u32,
        wrapped: &[u8],
    ) -> Result<SecretKey, KeyError> {
        let raw = self
            .kek
            .open(wrap_context(tenant, kind, version).as_bytes(), wrapped)
            .map_err(|_| KeyError::Tampered)?;
        SecretKey::from_slice(&raw).ok_or(KeyError::Tampered)
    }

    /// Counts `n` encryptions under the tenant's active version and returns
    /// that version for the caller to encrypt with. If they would take the
    /// version past `keys.rotate_after_encryptions` (the nonce bound of SPEC
    /// §2), the tenant key rotates first and the count goes to the new
    /// version; the second value then names it. Reservations are applied to
    /// the store before the encryptions happen, so the caller's commit makes
    /// them durable with the ciphertexts; near the bound they are exact, so
    /// that a restart resumes the count where it was.
    pub fn reserve_encryptions(
        &self,
        keys: &TenantKeys,
        n: u64,
    ) -> Result<(ActiveKey, Option<u32>), KeyError> {
        let limit = self.rotate_after.max(n);
        let (version, key) = {
            let v = keys.versions.read();
            (v.active, v.data[&v.active].clone())
        };
        let after = key.counter.count.fetch_add(n, Ordering::Relaxed) + n;
        if after > limit {
            key.counter.count.fetch_sub(n, Ordering::Relaxed);
            let _serial = self.rotating.lock();
            // Another write may have rotated while we waited.
            if keys.active_version() == version {
                self.rotate_now(keys)?;
            }
            let (active, _) = self.reserve_encryptions(keys, n)?;
            let version = active.version;
            return Ok((active, Some(version)));
        }
        {
            let mut reserved = key.counter.reserved.lock();
            if after > *reserved {
                let next = if after + COUNTER_BLOCK > limit {
                    after
                } else {
                    after + COUNTER_BLOCK
                };
                let mut b = Batch::new();
                b.put(
                    Space::Counters,
                    tenant_key_id(&keys.tenant, "data", version),
                    next.to_be_bytes().to_vec(),
                );
                self.store.apply(b)?;
                *reserved = next;
            }
        }
        Ok((ActiveKey { version, key }, None))
    }

    /// Makes a new data key version the tenant's active one, at once, and
    /// returns it. Durable once the caller has synced the store.
    pub fn rotate(&self, keys: &TenantKeys) -> Result<u32, KeyError> {
        let _serial = self.rotating.lock();
        self.rotate_now(keys)
    }

    fn rotate_now(&self, keys: &TenantKeys) -> Result<u32, KeyError> {
        let tenant = &keys.tenant;
        // Never reuse a number, even of a retired version.
        let next = self
            .store
            .get(Space::Keys, &tenant_key_id(tenant, "next", 0))?
            .map(|v| v.try_into().map(u32::from_be_bytes))
            .transpose()
            .map_err(|_| KeyError::Tampered)?
            .unwrap_or(0)
            .max(keys.versions.read().data.keys().max().copied().unwrap_or(0) + 1);
        let data = SecretKey::random();
        let mut b = Batch::new();
        b.put(
            Space::Keys,
            tenant_key_id(tenant, "data", next),
            self.kek
                .seal(wrap_context(tenant, "data", next).as_bytes(), data.expose()),
        );
        b.put(
            Space::Keys,
            tenant_key_id(tenant, "active", 0),
            next.to_be_bytes().to_vec(),
        );
        b.put(
            Space::Keys,
            tenant_key_id(tenant, "next", 0),
            (next + 1).to_be_bytes().to_vec(),
        );
        b.put(
            Space::Counters,
            tenant_key_id(tenant, "data", next),
            0u64.to_be_bytes().to_vec(),
        );
        self.store.apply(b)?;
        let mut v = keys.versions.write();
        v.data.insert(next, Arc::new(DataKey::new(data.aead(), 0)));
        v.active = next;
        Ok(next)
    }
}

impl Keyring {
    /// Destroys a key version that seals nothing: its wrapped key and count
    /// are deleted from the store (a tombstone keeps its number from being
    /// reused) and its unwrapped key is dropped, which zeroizes it.
    /// `in_use` counts the fields the version still seals; it runs with
    /// every write of the tenant held off.
    pub fn retire<E: From<RetireError>>(
        &self,
        keys: &TenantKeys,
        version: u32,
        in_use: impl FnOnce() -> Result<u64, E>,
    ) -> Result<(), E> {
        let _no_writes = keys.writes.write();
        {
            let v = keys.versions.read();
            if v.active == version {
                return Err(RetireError::Active.into());
            }
            if !v.data.contains_key(&version) {
                return Err(RetireError::Unknown.into());
            }
        }
        let n = in_use()?;
        if n > 0 {
            return Err(RetireError::InUse(n).into());
        }
        let tenant = &keys.tenant;
        let mut b = Batch::new();
        b.delete(Space::Keys, tenant_key_id(tenant, "data", version));
        b.delete(Space::Counters, tenant_key_id(tenant, "data", version));
        b.put(
            Space::Keys,
            tenant_key_id(tenant, "retired", version),
            Vec::new(),
        );
        self.store
            .apply(b)
            .map_err(|e| RetireError::Key(KeyError::Storage(e)))?;
        keys.versions.write().data.remove(&version);
        Ok(())
    }

    /// The versions of a tenant that were retired.
    pub fn retired_versions(&self, keys: &TenantKeys) -> Result<Vec<u32>, KeyError> {
        let mut p = tenant_prefix(&keys.tenant);
        p.extend_from_slice(b"retired\0");
        self.store
            .scan_prefix(Space::Keys, &p, usize::MAX)?
            .into_iter()
            .map(|(k, _)| {
                k[p.len()..]
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| KeyError::Tampered)
            })
            .collect()
    }
}

/// Why a key version cannot be retired.
#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("the active version cannot be retired: rotate first")]
    Active,
    #[error("no such live key version")]
    Unknown,
    #[error("{0} fields are still sealed under this version: rewrap first")]
    InUse(u64),
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl DataKey {
    fn new(aead: Aead256, count: u64) -> Self {
        Self {
            aead,
            counter: EncryptionCounter {
                count: AtomicU64::new(count),
                reserved: Mutex::new(count),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SledOptions;

    const BOUND: u64 = 1 << 40;

    fn store(dir: &Path) -> Storage {
        Storage::open_sled(
            dir,
            &SledOptions {
                cache_capacity_bytes: 1 << 20,
            },
        )
        .unwrap()
    }

    #[test]
    fn key_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.key");
        generate_key_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(generate_key_file(&path).is_err(), "never overwrites");
        load_key_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn wrong_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        Keyring::open(s.clone(), &MasterKey(SecretKey::random()), BOUND).unwrap();
        let err = Keyring::open(s, &MasterKey(SecretKey::random()), BOUND).unwrap_err();
        assert!(matches!(err, KeyError::WrongKey));
    }

    #[test]
    fn tenant_keys_are_stored_wrapped_and_bound_to_their_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let ring = Keyring::open(s.clone(), &MasterKey(SecretKey::random()), BOUND).unwrap();
        let mut b = Batch::new();
        ring.add_new_tenant("a", &mut b);
        ring.add_new_tenant("b", &mut b);
        s.apply(b).unwrap();
        let a = ring.tenant("a").unwrap().unwrap();
        let b = ring.tenant("b").unwrap().unwrap();
        let (active, _) = ring.reserve_encryptions(&a, 1).unwrap();
        let sealed = a.encrypt_field(&active, "r1", "nir", b"1850775123456");
        assert_eq!(
            &a.decrypt_field("r1", "nir", &sealed).unwrap()[..],
            b"1850775123456"
        );
        assert!(b.decrypt_field("r1", "nir", &sealed).is_err());
        assert!(ring.tenant("nope").unwrap().is_none());
        // Swapping the wrapped keys of two tenants is detected.
        let ka = s
            .get(Space::Keys, &tenant_key_id("a", "data", 1))
            .unwrap()
            .unwrap();
        let mut swap = Batch::new();
        swap.put(Space::Keys, tenant_key_id("b", "data", 1), ka);
        s.apply(swap).unwrap();
        assert!(matches!(ring.load_tenant("b"), Err(KeyError::Tampered)));
    }

    #[test]
    fn encryption_count_is_reserved_durably() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let master = SecretKey::random();
        let m = MasterKey(SecretKey::from_slice(master.expose()).unwrap());
        let ring = Keyring::open(s.clone(), &m, BOUND).unwrap();
        let mut b = Batch::new();
        ring.add_new_tenant("t", &mut b);
        s.apply(b).unwrap();
        let k = ring.tenant("t").unwrap().unwrap();
        let _ = ring.reserve_encryptions(&k, 10).unwrap();
        assert_eq!(k.encryption_counts(), vec![(1, 10)]);
        let ring2 = Keyring::open(s, &m, BOUND).unwrap();
        let k2 = ring2.tenant("t").unwrap().unwrap();
        let after_restart = k2.encryption_counts()[0].1;
        assert!(after_restart >= 10, "a restart never under-counts");
    }

    #[test]
    fn rotation_at_the_bound_is_exact_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let master = SecretKey::random();
        let m = MasterKey(SecretKey::from_slice(master.expose()).unwrap());
        let ring = Keyring::open(s.clone(), &m, 10).unwrap();
        let mut b = Batch::new();
        ring.add_new_tenant("t", &mut b);
        s.apply(b).unwrap();
        let k = ring.tenant("t").unwrap().unwrap();
        let (a, rotated) = ring.reserve_encryptions(&k, 4).unwrap();
        assert_eq!((a.version(), rotated), (1, None));
        let old = k.encrypt_field(&a, "r", "f", b"v1");
        let (_, rotated) = ring.reserve_encryptions(&k, 6).unwrap();
        assert_eq!(rotated, None, "exactly at the bound: still version 1");
        drop(ring);
        // Reopened: the count resumed exactly, so one more rotates.
        let ring = Keyring::open(s.clone(), &m, 10).unwrap();
        let k = ring.tenant("t").unwrap().unwrap();
        assert_eq!(k.encryption_counts(), vec![(1, 10)]);
        let (a, rotated) = ring.reserve_encryptions(&k, 1).unwrap();
        assert_eq!((a.version(), rotated), (2, Some(2)));
        assert_eq!(k.encryption_counts(), vec![(1, 10), (2, 1)]);
        assert_eq!(&k.decrypt_field("r", "f", &old).unwrap()[..], b"v1");
        assert_eq!(ring.rotate(&k).unwrap(), 3);
        let ring = Keyring::open(s, &m, 10).unwrap();
        assert_eq!(ring.tenant("t").unwrap().unwrap().active_version(), 3);
    }
}
