//! The key hierarchy.
//!
//! ```text
//! master key (key file, outside data_dir)
//!  ├─ HKDF "kek"          → wraps every key below (AES-256-GCM, AAD = the entry's name)
//!  │    ├─ secrets          pepper (Argon2id), audit chain key, budget and honeytoken keys
//!  │    └─ per tenant       data keys v1, v2, … (fields), index key (blind index HMAC),
//!  │                        and the next index key while it rotates
//!  ├─ HKDF "key-check"    → tells a wrong master key at start-up
//!  └─ HKDF "keyring-mac"  → authenticates the key store file as a whole
//! ```
//!
//! The wrapped keys live in `data_dir/keyring`, one file rewritten whole and
//! atomically on each change (never in sled, which keeps deleted values in
//! its log): a retired version or a shredded tenant leaves no bytes behind,
//! and a master-key rotation is a single atomic replace. Every secret is
//! random and wrapped, none derived from the master key, so a master
//! rotation changes nothing but the wrapping (the audit chain continues).
//!
//! Unwrapped keys live only in memory, in types that zeroize on drop and
//! print as `[redacted]`; a tenant's keys are unwrapped once and cached.

use std::{
    collections::{BTreeMap, HashMap},
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
use crate::store::{AtomicFile, Batch, Space, Storage, StorageError};
use prost::Message as _;

const KEY_FILE_PREFIX: &str = "coffre-master-key-v1:";
const KEY_CHECK_LABEL: &[u8] = b"coffre key check v1";
/// Encryptions reserved per durable counter write. After a crash the count
/// resumes at the reservation, so it can only over-count, never under-count.
pub const COUNTER_BLOCK: u64 = 4096;

/// Why the master key or the key store could not be used. Messages name
/// paths and modes, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key file {0}: {1}")]
    File(String, String),
    #[error(
        "master key file {path} is accessible by group or others (mode {mode:o}, {why}); run: chmod 600 {path}"
    )]
    Permissions {
        path: String,
        mode: u32,
        why: &'static str,
    },
    #[error("master key file {0} is not a Coffre master key")]
    Malformed(String),
    #[error("the master key does not match this data directory (key-check value differs)")]
    WrongKey,
    #[error("a stored key failed authentication: the key store was modified or damaged")]
    Tampered,
    #[error("{0} is missing but the data directory holds data: restore it from a backup")]
    MissingStore(String),
    #[error("this tenant name was shredded and cannot be used again")]
    Shredded,
    #[error(
        "this data directory comes from a development version that kept keys in sled; create a new one"
    )]
    Legacy,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    ShredList(#[from] crate::shredlist::ShredListError),
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

/// Whether only the server (and root) can read a key file: mode 0600 or
/// 0400; or 0440/0640 when the file belongs to root or the server and its
/// group is the server's own group (not root's) with no other members. The second form
/// is how Kubernetes mounts a Secret once the pod has an `fsGroup` (files
/// root-owned, group-readable by the pod's group), and how a host can give
/// a root-owned key to a dedicated service group. Others never have any
/// bit; the group never writes.
pub fn private_enough(meta: &fs::Metadata) -> Result<(), &'static str> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err("others have access");
    }
    if mode & 0o070 == 0 {
        return Ok(());
    }
    if mode & 0o030 != 0 {
        return Err("its group may write or execute it");
    }
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if meta.uid() != 0 && meta.uid() != uid {
        return Err("it belongs to another user");
    }
    if meta.gid() != gid {
        return Err("its group is not the server's own group");
    }
    // Root's group is shared by system accounts, never a service's own.
    if gid == 0 {
        return Err("its group is root's");
    }
    // A group listed with members is shared with other accounts.
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g))
            if g.mem.iter().any(|m| {
                nix::unistd::User::from_name(m)
                    .ok()
                    .flatten()
                    .is_none_or(|u| u.uid.as_raw() != uid)
            }) =>
        {
            Err("its group has other members")
        }
        _ => Ok(()),
    }
}

/// Reads the master key, refusing a file that others can read (see
/// [`private_enough`]).
pub fn load_key_file(path: &Path) -> Result<MasterKey, KeyError> {
    let shown = path.display().to_string();
    let meta = fs::metadata(path).map_err(|e| KeyError::File(shown.clone(), e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if let Err(why) = private_enough(&meta) {
        return Err(KeyError::Permissions {
            path: shown,
            mode,
            why,
        });
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

    /// The root of every backup file's keys: the file's own encryption and
    /// MAC keys are derived from it and the file's random salt (`backup`).
    pub fn backup_root(&self) -> SecretKey {
        crypto::derive_key(&self.0, "backup")
    }

    /// The key of the shred list's MAC (`shredlist`).
    pub fn shred_list_key(&self) -> SecretKey {
        crypto::derive_key(&self.0, "shred-list")
    }
}

/// The master key's check value: an HMAC under a key derived from it, so it
/// names the key without revealing it. Stored in the key store (a wrong key
/// is refused at start) and in every backup's manifest (a backup names the
/// key it needs); [`check_value_id`] is its short printed form.
pub fn key_check_value(master: &MasterKey) -> [u8; 32] {
    let check_key = crypto::derive_key(&master.0, "key-check");
    crypto::hmac_sha256(&check_key, KEY_CHECK_LABEL)
}

/// The first 8 bytes of a check value in hex: how operators label escrowed
/// master keys and how a backup names the key it was made under.
pub fn check_value_id(check: &[u8]) -> String {
    hex::encode(&check[..check.len().min(8)])
}

/// One tenant's unwrapped keys. Versions are added by rotation and removed
/// by retirement while the keys are shared, so they sit behind a lock; a
/// write takes the active version once ([`ActiveKey`]) for all its fields.
pub struct TenantKeys {
    tenant: String,
    versions: RwLock<Versions>,
    index: RwLock<Index>,
    /// MACs each stored record as a whole (its version, write id and the
    /// names and tags of all its fields). `None` only for a tenant of a
    /// data directory not yet migrated.
    record: Option<Arc<SecretKey>>,
    /// Held shared by every write from the choice of its key version until
    /// its ciphertexts are applied, and exclusively by a retirement, so no
    /// write can use a version as it is retired.
    writes: tokio::sync::RwLock<()>,
}

/// The blind-index key, and during a rotation of it the next one: writes
/// index under the next key, searches look under both, and a rebuild moves
/// every record's entries to the next key before it replaces the current.
struct Index {
    current: Arc<SecretKey>,
    next: Option<Arc<SecretKey>>,
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
    reserved: tokio::sync::Mutex<u64>,
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

    /// The blind-index token a write stores for an already normalised
    /// value of `field` (under the next index key while one is rotating in).
    pub fn index_token(&self, field: &str, normalized: &str) -> [u8; 32] {
        let i = self.index.read();
        token(
            i.next.as_ref().unwrap_or(&i.current),
            &self.tenant,
            field,
            normalized,
        )
    }

    /// The tokens a search looks for: one, or two while the index key
    /// rotates (records not yet rebuilt are under the current key).
    pub fn search_tokens(&self, field: &str, normalized: &str) -> Vec<[u8; 32]> {
        let i = self.index.read();
        std::iter::once(&i.current)
            .chain(i.next.as_ref())
            .map(|k| token(k, &self.tenant, field, normalized))
            .collect()
    }

    /// The MAC that seals a record as a whole; `data` is its canonical
    /// form (`records::record_mac_input`).
    pub fn record_mac(&self, data: &[u8]) -> Result<[u8; 32], CryptoError> {
        let key = self.record.as_ref().ok_or(CryptoError::Authentication)?;
        Ok(crypto::hmac_sha256(key, data))
    }

    /// Whether a rotation of the index key is under way.
    pub fn index_rotating(&self) -> bool {
        self.index.read().next.is_some()
    }

    /// Held by a write while it encrypts and applies (see `writes`).
    pub async fn write_guard(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.writes.read().await
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

fn token(key: &SecretKey, tenant: &str, field: &str, normalized: &str) -> [u8; 32] {
    let ctx = Context::new("coffre/index/v1")
        .with(tenant.as_bytes())
        .with(field.as_bytes())
        .with(normalized.as_bytes());
    crypto::hmac_sha256(key, ctx.as_bytes())
}

fn field_aad(tenant: &str, record_id: &str, field: &str) -> FieldAad {
    FieldAad::new(
        "coffre/field/v1",
        &[tenant.as_bytes(), record_id.as_bytes(), field.as_bytes()],
    )
}

/// Where a version's encryption count is kept in `Space::Counters`.
fn counter_id(tenant: &str, version: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 10);
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(b"\0data\0");
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// The name of the key store inside `data_dir`.
pub const KEYRING_FILE: &str = "keyring";
const KEYRING_MAGIC: &[u8] = b"coffre-keyring-v1\n";

/// Every wrapped key, and the few values that go with them, by name:
/// `check`; `secret/<pepper|audit|budget|honeytoken>`;
/// `tenant/<t>/data/<v>`, `tenant/<t>/index`, `tenant/<t>/active`,
/// `tenant/<t>/next`, `tenant/<t>/retired/<v>`.
#[derive(Clone, PartialEq, prost::Message)]
struct KeyringBody {
    #[prost(btree_map = "string, bytes", tag = "1")]
    entries: BTreeMap<String, Vec<u8>>,
}

/// The keys one master key gives: the wrapping key, the key-check value and
/// the key store's MAC key.
struct MasterDerived {
    kek: Aead256,
    check: [u8; 32],
    mac: SecretKey,
    /// The root of each backup file's keys (`backup`).
    backup: SecretKey,
}

impl MasterDerived {
    fn of(master: &MasterKey) -> Self {
        Self {
            kek: crypto::derive_key(&master.0, "kek").aead(),
            check: key_check_value(master),
            mac: crypto::derive_key(&master.0, "keyring-mac"),
            backup: crypto::derive_key(&master.0, "backup"),
        }
    }

    fn wrap(&self, name: &str, key: &SecretKey) -> Vec<u8> {
        self.kek.seal(wrap_aad(name).as_bytes(), key.expose())
    }

    fn unwrap(&self, name: &str, wrapped: &[u8]) -> Result<SecretKey, KeyError> {
        let raw = self
            .kek
            .open(wrap_aad(name).as_bytes(), wrapped)
            .map_err(|_| KeyError::Tampered)?;
        SecretKey::from_slice(&raw).ok_or(KeyError::Tampered)
    }

    /// The file's bytes: magic, body, MAC of both.
    fn seal_file(&self, entries: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
        let mut out = KEYRING_MAGIC.to_vec();
        KeyringBody {
            entries: entries.clone(),
        }
        .encode(&mut out)
        .expect("a Vec grows as needed");
        let mac = crypto::hmac_sha256(&self.mac, &out);
        out.extend_from_slice(&mac);
        out
    }

    /// Parses and authenticates the file: a different master key is
    /// `WrongKey`, any other change `Tampered`.
    fn open_file(&self, bytes: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, KeyError> {
        let body = bytes
            .strip_prefix(KEYRING_MAGIC)
            .filter(|b| b.len() >= 32)
            .ok_or(KeyError::Tampered)?;
        let (body, mac) = body.split_at(body.len() - 32);
        let entries = KeyringBody::decode(body)
            .map_err(|_| KeyError::Tampered)?
            .entries;
        let check = entries.get("check").ok_or(KeyError::Tampered)?;
        if !crypto::ct_eq(check, &self.check) {
            return Err(KeyError::WrongKey);
        }
        let want = crypto::hmac_sha256(&self.mac, &bytes[..bytes.len() - 32]);
        if !crypto::ct_eq(mac, &want) {
            return Err(KeyError::Tampered);
        }
        Ok(entries)
    }
}

/// Wrapping binds each key to its entry name (tenant, kind, version), so
/// no wrapped key can stand in for another.
fn wrap_aad(name: &str) -> Context {
    Context::new("coffre/keyring/v1").with(name.as_bytes())
}

fn tenant_entry(tenant: &str, rest: &str) -> String {
    format!("tenant/{tenant}/{rest}")
}

const SECRETS: [&str; 4] = ["pepper", "audit", "budget", "honeytoken"];

/// The vault's keys: the wrapping key, the secrets it wraps (pepper, audit
/// key, …), and a cache of unwrapped tenant keys.
///
/// Wrapped keys live in the key store file `data_dir/keyring`, rewritten
/// whole on each change, not in sled: sled is log-structured and keeps a
/// deleted value's bytes in its files, and a retired or shredded key must
/// leave none. Encryption counts, written often and not secret, stay in
/// sled.
pub struct Keyring {
    store: Storage,
    home: KeyHome,
    /// The database row's version last read or written (`KeyHome::Db`).
    seen_version: std::sync::atomic::AtomicI64,
    /// Bumped whenever the keys are reloaded from another node's change.
    generation: AtomicU64,
    master: MasterDerived,
    entries: Mutex<BTreeMap<String, Vec<u8>>>,
    pepper: SecretKey,
    audit: SecretKey,
    /// Names the records a principal read, in its stored read budget.
    budget: SecretKey,
    /// Marks honeytoken records without naming them in the clear.
    honeytoken: SecretKey,
    /// A tenant data key version encrypts at most this many values.
    rotate_after: u64,
    /// Rotations one at a time.
    rotating: tokio::sync::Mutex<()>,
    tenants: RwLock<HashMap<String, Arc<TenantKeys>>>,
    /// The shred list beside the master key (`shredlist`), once attached.
    shred_list: Mutex<Option<crate::shredlist::ShredList>>,
}

/// Where the sealed key store lives.
#[derive(Clone)]
pub enum KeyHome {
    /// `data_dir/keyring`, one file rewritten whole (sled).
    File(AtomicFile),
    /// A row of the database every node shares (postgres): changed under a
    /// lock, each node's change made on top of the others'; its version
    /// read through the pool.
    Db(crate::store::postgres::KeyStoreRow, deadpool_postgres::Pool),
}

impl KeyHome {
    /// The key store file of `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        Self::File(AtomicFile::new(data_dir.join(KEYRING_FILE)))
    }

    fn read(&self) -> Result<Option<(i64, Vec<u8>)>, StorageError> {
        match self {
            Self::File(f) => Ok(f.read()?.map(|b| (0, b))),
            Self::Db(row, _) => row.read(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::File(f) => f.path().display().to_string(),
            Self::Db(..) => "the PostgreSQL table coffre_keystore".into(),
        }
    }
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring([redacted])")
    }
}

impl Keyring {
    /// Opens the key store in `data_dir` with `master`, or creates it (with
    /// a new pepper, audit key, budget and honeytoken keys) in a new data
    /// directory. Refuses a different master key, and a modified store.
    pub async fn open(
        store: Storage,
        home: KeyHome,
        master: &MasterKey,
        rotate_after: u64,
    ) -> Result<Self, KeyError> {
        let derived = MasterDerived::of(master);
        let mut seen = 0;
        let entries = match home.read()? {
            Some((version, bytes)) => {
                seen = version;
                derived.open_file(&bytes)?
            }
            None => {
                if store.get(Space::Meta, b"key_check").await?.is_some() {
                    return Err(KeyError::Legacy);
                }
                // Data without its key store: making new keys would leave
                // every record unreadable and every password unverifiable.
                if !store.scan_prefix(Space::Tenants, b"", 1).await?.is_empty() {
                    return Err(KeyError::MissingStore(home.describe()));
                }
                let mut e = BTreeMap::new();
                e.insert("check".to_string(), derived.check.to_vec());
                for name in SECRETS {
                    let name = format!("secret/{name}");
                    let wrapped = derived.wrap(&name, &SecretKey::random());
                    e.insert(name, wrapped);
                }
                match &home {
                    KeyHome::File(file) => file.replace(&derived.seal_file(&e))?,
                    KeyHome::Db(row, _) => {
                        // Another node may have made the store first: then
                        // its keys are the vault's.
                        let (e2, v) = row.modify(|current| -> Result<_, KeyError> {
                            let e = match current {
                                Some(b) => derived.open_file(&b)?,
                                None => e,
                            };
                            Ok((derived.seal_file(&e), e))
                        })?;
                        seen = v;
                        e = e2;
                    }
                }
                e
            }
        };
        let secret = |name: &str| {
            let name = format!("secret/{name}");
            derived.unwrap(&name, entries.get(&name).ok_or(KeyError::Tampered)?)
        };
        Ok(Self {
            pepper: secret("pepper")?,
            audit: secret("audit")?,
            budget: secret("budget")?,
            honeytoken: secret("honeytoken")?,
            store,
            home,
            seen_version: std::sync::atomic::AtomicI64::new(seen),
            generation: AtomicU64::new(0),
            master: derived,
            entries: Mutex::new(entries),
            rotate_after,
            rotating: tokio::sync::Mutex::new(()),
            tenants: RwLock::new(HashMap::new()),
            shred_list: Mutex::new(None),
        })
    }

    /// Checks the key store against the shred list kept beside the master
    /// key, then keeps the list for later shreds: a listed tenant whose keys
    /// are here (a data directory or backup from before its shredding) has
    /// them destroyed again, and a tenant shredded here but missing from
    /// the list (shredded before lists existed) is added. Returns the
    /// tenants shredded again, whose data the caller must delete.
    pub fn attach_shred_list(
        &self,
        mut list: crate::shredlist::ShredList,
    ) -> Result<Vec<String>, KeyError> {
        let entries = self.entries.lock().clone();
        let now = crate::clock::now_ms();
        for name in entries.keys() {
            if let Some(t) = name.strip_prefix("shredded/") {
                list.add(t, now)?;
            }
        }
        let came_back: Vec<String> = list
            .tenants()
            .map(|(t, _)| t.to_string())
            .filter(|t| {
                entries.contains_key(&tenant_entry(t, "active"))
                    || !entries.contains_key(&format!("shredded/{t}"))
            })
            .collect();
        if !came_back.is_empty() {
            self.update(|e| {
                for t in &came_back {
                    let prefix = tenant_entry(t, "");
                    e.retain(|k, _| !k.starts_with(&prefix));
                    e.insert(format!("shredded/{t}"), Vec::new());
                }
                Ok(())
            })?;
            let mut cache = self.tenants.write();
            for t in &came_back {
                cache.remove(t);
            }
        }
        *self.shred_list.lock() = Some(list);
        Ok(came_back
            .into_iter()
            .filter(|t| entries.contains_key(&tenant_entry(t, "active")))
            .collect())
    }

    /// The key store file's bytes as of now (wrapped keys only, MAC'd under
    /// the master key): what a backup holds of the keys.
    pub fn sealed_bytes(&self) -> Vec<u8> {
        self.master.seal_file(&self.entries.lock())
    }

    /// The master key's check value (see [`key_check_value`]).
    pub fn key_check(&self) -> [u8; 32] {
        self.master.check
    }

    /// The root of backup files' keys (see [`MasterKey::backup_root`]).
    pub fn backup_root(&self) -> &SecretKey {
        &self.master.backup
    }

    /// Applies `change` to the entries and writes the key store, durably,
    /// before anything uses the change.
    fn update(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Vec<u8>>) -> Result<(), KeyError> + Send,
    ) -> Result<(), KeyError> {
        let mut entries = self.entries.lock();
        match &self.home {
            KeyHome::File(file) => {
                let mut next = entries.clone();
                change(&mut next)?;
                file.replace(&self.master.seal_file(&next))?;
                *entries = next;
            }
            KeyHome::Db(row, _) => {
                let master = &self.master;
                let (next, version) = row.modify(|current| -> Result<_, KeyError> {
                    let current = current.ok_or(KeyError::Tampered)?;
                    let mut next = master.open_file(&current)?;
                    change(&mut next)?;
                    Ok((master.seal_file(&next), next))
                })?;
                self.seen_version.store(version, Ordering::SeqCst);
                // Another node's changes came in with ours.
                self.tenants.write().clear();
                self.generation.fetch_add(1, Ordering::SeqCst);
                *entries = next;
            }
        }
        Ok(())
    }

    /// Re-reads the shared key store when another node changed it (its
    /// version moved): a rotation there is used here for the next write.
    /// Returns whether it reloaded. Nothing to do for a key store file,
    /// which only this process writes.
    pub fn refresh_if(&self, version: i64) -> Result<bool, KeyError> {
        if !matches!(self.home, KeyHome::Db(..))
            || version == self.seen_version.load(Ordering::SeqCst)
        {
            return Ok(false);
        }
        let mut entries = self.entries.lock();
        let Some((v, bytes)) = self.home.read()? else {
            return Err(KeyError::Tampered);
        };
        *entries = self.master.open_file(&bytes)?;
        self.seen_version.store(v, Ordering::SeqCst);
        self.tenants.write().clear();
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    /// Where the key store is shared: reloads it if another node changed
    /// it (one cheap read of its version). Called before a tenant's keys
    /// are used, so that a rotation on another node is used here from the
    /// next call.
    pub async fn follow(&self) -> Result<(), KeyError> {
        let KeyHome::Db(_, pool) = &self.home else {
            return Ok(());
        };
        let version = crate::store::postgres::keystore_version(pool).await?;
        if version != self.seen_version.load(Ordering::SeqCst) {
            self.refresh_if(version)?;
        }
        Ok(())
    }

    /// How many times the keys were reloaded from another node's change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The Argon2id pepper (a server-side secret mixed into every hash).
    pub fn pepper(&self) -> &SecretKey {
        &self.pepper
    }

    /// The key that MACs the audit chain. Random and wrapped, not derived
    /// from the master key, so that the chain continues, verifiably, across
    /// a master-key rotation.
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

    /// Makes a new tenant's keys (data key version 1, index key), durably.
    /// Keys left by an earlier attempt that crashed before the tenant was
    /// stored are replaced: nothing uses them.
    pub fn create_tenant_keys(&self, tenant: &str) -> Result<(), KeyError> {
        if self.is_shredded(tenant) {
            return Err(KeyError::Shredded);
        }
        self.tenants.write().remove(tenant);
        self.update(|e| {
            let prefix = tenant_entry(tenant, "");
            e.retain(|k, _| !k.starts_with(&prefix));
            let data = tenant_entry(tenant, "data/1");
            let index = tenant_entry(tenant, "index");
            let wrapped_data = self.master.wrap(&data, &SecretKey::random());
            let wrapped_index = self.master.wrap(&index, &SecretKey::random());
            let record = tenant_entry(tenant, "record");
            let wrapped_record = self.master.wrap(&record, &SecretKey::random());
            e.insert(data, wrapped_data);
            e.insert(index, wrapped_index);
            e.insert(record, wrapped_record);
            e.insert(tenant_entry(tenant, "active"), 1u32.to_be_bytes().to_vec());
            e.insert(tenant_entry(tenant, "next"), 2u32.to_be_bytes().to_vec());
            Ok(())
        })
    }

    /// The tenant's unwrapped keys, or `None` if it has none.
    pub async fn tenant(&self, tenant: &str) -> Result<Option<Arc<TenantKeys>>, KeyError> {
        if let Some(k) = self.tenants.read().get(tenant) {
            return Ok(Some(k.clone()));
        }
        let Some(keys) = self.load_tenant(tenant).await? else {
            return Ok(None);
        };
        let keys = Arc::new(keys);
        self.tenants
            .write()
            .entry(tenant.to_string())
            .or_insert(keys.clone());
        Ok(Some(keys))
    }

    async fn load_tenant(&self, tenant: &str) -> Result<Option<TenantKeys>, KeyError> {
        let entries = self.entries.lock().clone();
        let mut reserved = HashMap::new();
        for version in data_versions(&entries, tenant)? {
            let r = self
                .store
                .get(Space::Counters, &counter_id(tenant, version))
                .await?
                .map(|v| v.try_into().map(u64::from_be_bytes))
                .transpose()
                .map_err(|_| KeyError::Tampered)?
                .unwrap_or(0);
            reserved.insert(version, r);
        }
        tenant_keys(&self.master, &entries, tenant, &reserved)
    }

    /// The record format this data directory's records are in: 1 before
    /// records were sealed as a whole, [`RECORD_FORMAT`] since.
    pub fn record_format(&self) -> u32 {
        self.entries
            .lock()
            .get(RECORD_FORMAT_ENTRY)
            .and_then(|v| v.as_slice().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(1)
    }

    /// Gives every tenant in `tenants` that has none a record key (data
    /// directories made before records were sealed as a whole).
    pub fn ensure_record_keys(&self, tenants: &[String]) -> Result<(), KeyError> {
        self.update(|e| {
            for t in tenants {
                let name = tenant_entry(t, "record");
                if e.contains_key(&tenant_entry(t, "active")) && !e.contains_key(&name) {
                    let wrapped = self.master.wrap(&name, &SecretKey::random());
                    e.insert(name, wrapped);
                }
            }
            Ok(())
        })?;
        self.tenants.write().clear();
        Ok(())
    }

    /// Records that every record is now sealed as a whole.
    pub fn set_record_format(&self, format: u32) -> Result<(), KeyError> {
        self.update(|e| {
            e.insert(RECORD_FORMAT_ENTRY.into(), format.to_be_bytes().to_vec());
            Ok(())
        })
    }

    /// Encryptions after which a key version rotates
    /// (`keys.rotate_after_encryptions`).
    pub fn rotation_bound(&self) -> u64 {
        self.rotate_after
    }

    /// Counts `n` encryptions under the tenant's active version and returns
    /// that version for the caller to encrypt with. If they would take the
    /// version past `keys.rotate_after_encryptions` (the nonce bound of
    /// AES-GCM with random nonces), the tenant key rotates first and the count goes to the new
    /// version; the second value then names it. Reservations are applied to
    /// the store before the encryptions happen, so the caller's commit makes
    /// them durable with the ciphertexts; near the bound they are exact, so
    /// that a restart resumes the count where it was.
    pub async fn reserve_encryptions(
        &self,
        keys: &TenantKeys,
        n: u64,
    ) -> Result<(ActiveKey, Option<u32>), KeyError> {
        let limit = self.rotate_after.max(n);
        let (version, key) = {
            let v = keys.versions.read();
            // No active key: the tenant was shredded under this write.
            let key = v.data.get(&v.active).cloned().ok_or(KeyError::Shredded)?;
            (v.active, key)
        };
        let after = key.counter.count.fetch_add(n, Ordering::Relaxed) + n;
        if after > limit {
            key.counter.count.fetch_sub(n, Ordering::Relaxed);
            let _serial = self.rotating.lock().await;
            // Another write may have rotated while we waited.
            if keys.active_version() == version {
                self.rotate_now(keys).await?;
            }
            let (active, _) = Box::pin(self.reserve_encryptions(keys, n)).await?;
            let version = active.version;
            return Ok((active, Some(version)));
        }
        if self.store.is_shared() {
            let mut reserved = key.counter.reserved.lock().await;
            if after > *reserved {
                // Nodes on one database reserve blocks of the one count:
                // each block starts where the stored count is (whatever
                // other nodes took), so the stored count is never below
                // the encryptions made.
                let id = counter_id(&keys.tenant, version);
                let mut tries = 0;
                loop {
                    let raw = self.store.get(Space::Counters, &id).await?;
                    let stored = raw
                        .as_deref()
                        .map(|v| v.try_into().map(u64::from_be_bytes))
                        .transpose()
                        .map_err(|_| KeyError::Tampered)?
                        .unwrap_or(0);
                    let start = stored.max(after - n);
                    if start + n > limit {
                        // Other nodes took the version to its bound.
                        drop(reserved);
                        key.counter.count.store(limit, Ordering::Relaxed);
                        return Box::pin(self.reserve_encryptions(keys, n)).await;
                    }
                    // Near the bound, exact (as one node's blocks are).
                    let next = if start + n + COUNTER_BLOCK > limit {
                        start + n
                    } else {
                        start + n + COUNTER_BLOCK
                    };
                    let mut b = Batch::new();
                    b.expect(Space::Counters, id.clone(), raw);
                    b.put(Space::Counters, id.clone(), next.to_be_bytes().to_vec());
                    match self.store.apply(b).await {
                        Ok(()) => {
                            key.counter.count.store(start + n, Ordering::Relaxed);
                            *reserved = next;
                            break;
                        }
                        Err(StorageError::Conflict) if tries < 64 => tries += 1,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        } else {
            let mut reserved = key.counter.reserved.lock().await;
            if after > *reserved {
                let next = if after + COUNTER_BLOCK > limit {
                    after
                } else {
                    after + COUNTER_BLOCK
                };
                let mut b = Batch::new();
                b.put(
                    Space::Counters,
                    counter_id(&keys.tenant, version),
                    next.to_be_bytes().to_vec(),
                );
                self.store.apply(b).await?;
                *reserved = next;
            }
        }
        Ok((ActiveKey { version, key }, None))
    }

    /// Makes a new data key version the tenant's active one, at once, and
    /// returns it. Durable once the caller has synced the store.
    pub async fn rotate(&self, keys: &TenantKeys) -> Result<u32, KeyError> {
        let _serial = self.rotating.lock().await;
        self.rotate_now(keys).await
    }

    async fn rotate_now(&self, keys: &TenantKeys) -> Result<u32, KeyError> {
        let tenant = &keys.tenant;
        let data = SecretKey::random();
        let mut version = 0;
        // Never reuse a number, even of a retired version.
        self.update(|e| {
            let next_name = tenant_entry(tenant, "next");
            let stored = e
                .get(&next_name)
                .map(|v| v.as_slice().try_into().map(u32::from_be_bytes))
                .transpose()
                .map_err(|_| KeyError::Tampered)?
                .unwrap_or(0);
            let live_max = keys.versions.read().data.keys().max().copied().unwrap_or(0);
            version = stored.max(live_max + 1);
            let name = tenant_entry(tenant, &format!("data/{version}"));
            let wrapped = self.master.wrap(&name, &data);
            e.insert(name, wrapped);
            e.insert(
                tenant_entry(tenant, "active"),
                version.to_be_bytes().to_vec(),
            );
            e.insert(next_name, (version + 1).to_be_bytes().to_vec());
            Ok(())
        })?;
        let mut b = Batch::new();
        b.put(
            Space::Counters,
            counter_id(tenant, version),
            0u64.to_be_bytes().to_vec(),
        );
        self.store.apply(b).await?;
        let mut v = keys.versions.write();
        v.data
            .insert(version, Arc::new(DataKey::new(data.aead(), 0)));
        v.active = version;
        Ok(version)
    }
}

impl Keyring {
    /// Destroys a key version that seals nothing: its wrapped key and count
    /// are deleted from the store (a tombstone keeps its number from being
    /// reused) and its unwrapped key is dropped, which zeroizes it.
    /// `in_use` counts the fields the version still seals; it runs with
    /// every write of the tenant held off.
    /// Whether `version` could be retired now as far as the keys know: a
    /// live version, not the active one (what uses it is the caller's to
    /// count).
    pub fn retirable(&self, keys: &TenantKeys, version: u32) -> Result<(), RetireError> {
        let v = keys.versions.read();
        if v.active == version {
            return Err(RetireError::Active);
        }
        if !v.data.contains_key(&version) {
            return Err(RetireError::Unknown);
        }
        Ok(())
    }

    pub async fn retire<E: From<RetireError>>(
        &self,
        keys: &TenantKeys,
        version: u32,
        in_use: impl FnOnce() -> Result<u64, E>,
    ) -> Result<(), E> {
        let _no_writes = keys.writes.write().await;
        self.retirable(keys, version)?;
        let n = in_use()?;
        if n > 0 {
            return Err(RetireError::InUse(n).into());
        }
        let tenant = &keys.tenant;
        // The tombstone keeps the version's count of encryptions, for
        // KeyStatus; the count in sled goes.
        let count = keys
            .versions
            .read()
            .data
            .get(&version)
            .map_or(0, |k| k.counter.count.load(Ordering::Relaxed));
        self.update(|e| {
            e.remove(&tenant_entry(tenant, &format!("data/{version}")));
            e.insert(
                tenant_entry(tenant, &format!("retired/{version}")),
                count.to_be_bytes().to_vec(),
            );
            Ok(())
        })
        .map_err(RetireError::Key)?;
        let mut b = Batch::new();
        b.delete(Space::Counters, counter_id(tenant, version));
        self.store
            .apply(b)
            .await
            .map_err(|e| RetireError::Key(KeyError::Storage(e)))?;
        keys.versions.write().data.remove(&version);
        Ok(())
    }

    /// Starts (or, after a crash, continues) a rotation of the tenant's
    /// blind-index key: the next key is made and stored, durably, if there
    /// is none yet; writes index under it from now on.
    pub async fn begin_index_rotation(&self, keys: &TenantKeys) -> Result<(), KeyError> {
        // No write may straddle the switch: one that computed its tokens
        // under the current key and applied them after the rebuild passed
        // its record would be lost to searches once the key is destroyed.
        // (Lock order everywhere: writes, then rotating.)
        let _no_writes = keys.writes.write().await;
        let _serial = self.rotating.lock().await;
        if keys.index_rotating() {
            return Ok(());
        }
        let next = SecretKey::random();
        let name = tenant_entry(&keys.tenant, "index-next/index");
        self.update(|e| {
            e.insert(name.clone(), self.master.wrap(&name, &next));
            Ok(())
        })?;
        keys.index.write().next = Some(Arc::new(next));
        Ok(())
    }

    /// Ends a rotation of the index key once every record is indexed under
    /// the next key: it becomes the current one, and the old key is
    /// destroyed (the key store is rewritten without it).
    pub async fn finish_index_rotation(&self, keys: &TenantKeys) -> Result<(), KeyError> {
        let _serial = self.rotating.lock().await;
        let Some(next) = keys.index.read().next.clone() else {
            return Ok(());
        };
        let current = tenant_entry(&keys.tenant, "index");
        let next_name = tenant_entry(&keys.tenant, "index-next/index");
        self.update(|e| {
            e.insert(current.clone(), self.master.wrap(&current, &next));
            e.remove(&next_name);
            Ok(())
        })?;
        let mut i = keys.index.write();
        i.current = next;
        i.next = None;
        Ok(())
    }

    /// Destroys every key of `tenant` (crypto-shredding): the key store is
    /// rewritten without them, with a tombstone that keeps the name from
    /// being reused, and the unwrapped keys are dropped from the cache
    /// (they zeroize when the last user lets go).
    pub async fn shred_tenant(&self, tenant: &str) -> Result<(), KeyError> {
        // On the list beside the master key first: from then on no restore
        // or copy brings the tenant back, even if we stop right here.
        if let Some(list) = self.shred_list.lock().as_mut() {
            list.add(tenant, crate::clock::now_ms())?;
        }
        let cached = self.tenants.read().get(tenant).cloned();
        // Writes in flight finish first; later ones find no key.
        let _no_writes = match cached.as_ref() {
            Some(k) => Some(k.writes.write().await),
            None => None,
        };
        self.update(|e| {
            let prefix = tenant_entry(tenant, "");
            e.retain(|k, _| !k.starts_with(&prefix));
            e.insert(format!("shredded/{tenant}"), Vec::new());
            Ok(())
        })?;
        self.tenants.write().remove(tenant);
        if let Some(k) = &cached {
            // Whoever still holds these keys holds nothing now: the data
            // keys drop (and zeroize) here, the index key is replaced.
            k.versions.write().data.clear();
            *k.index.write() = Index {
                current: Arc::new(SecretKey::random()),
                next: None,
            };
        }
        Ok(())
    }

    /// How many tenants the attached shred list ever named, and its MAC
    /// (a backup's manifest keeps both).
    pub fn shred_list_state(&self) -> Option<(u64, [u8; 32])> {
        self.shred_list
            .lock()
            .as_ref()
            .map(|l| (l.count(), l.mac()))
    }

    /// Whether `tenant`'s keys were shredded.
    pub fn is_shredded(&self, tenant: &str) -> bool {
        self.entries
            .lock()
            .contains_key(&format!("shredded/{tenant}"))
            || self
                .shred_list
                .lock()
                .as_ref()
                .is_some_and(|l| l.contains(tenant))
    }

    /// The stored (wrapped) bytes of a tenant's data key version: what a
    /// copy of the data directory holds of it. For tests of destruction.
    pub fn wrapped_data_key(&self, tenant: &str, version: u32) -> Option<Vec<u8>> {
        self.entries
            .lock()
            .get(&tenant_entry(tenant, &format!("data/{version}")))
            .cloned()
    }

    /// The versions of a tenant that were retired, with the encryptions
    /// each performed.
    pub fn retired_versions(&self, keys: &TenantKeys) -> Result<Vec<(u32, u64)>, KeyError> {
        let prefix = tenant_entry(&keys.tenant, "retired/");
        self.entries
            .lock()
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|ver| (ver, v)))
            .map(|(ver, count)| {
                let version = ver.parse().map_err(|_| KeyError::Tampered)?;
                let count = <[u8; 8]>::try_from(count.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| KeyError::Tampered)?;
                Ok((version, count))
            })
            .collect()
    }
}

/// The data key versions a tenant has in `entries`.
fn data_versions(entries: &BTreeMap<String, Vec<u8>>, tenant: &str) -> Result<Vec<u32>, KeyError> {
    let prefix = tenant_entry(tenant, "data/");
    let mut out = Vec::new();
    for (name, _) in entries.range(prefix.clone()..) {
        let Some(v) = name.strip_prefix(&prefix) else {
            break;
        };
        out.push(v.parse().map_err(|_| KeyError::Tampered)?);
    }
    Ok(out)
}

/// A tenant's keys unwrapped from `entries`, with each version's reserved
/// encryption count; `None` if it has none.
fn tenant_keys(
    master: &MasterDerived,
    entries: &BTreeMap<String, Vec<u8>>,
    tenant: &str,
    reserved: &HashMap<u32, u64>,
) -> Result<Option<TenantKeys>, KeyError> {
    let Some(active) = entries.get(&tenant_entry(tenant, "active")) else {
        return Ok(None);
    };
    let active = u32::from_be_bytes(
        active
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Tampered)?,
    );
    let index_name = tenant_entry(tenant, "index");
    let index = master.unwrap(
        &index_name,
        entries.get(&index_name).ok_or(KeyError::Tampered)?,
    )?;
    let record_name = tenant_entry(tenant, "record");
    let record = entries
        .get(&record_name)
        .map(|w| master.unwrap(&record_name, w).map(Arc::new))
        .transpose()?;
    let next_name = tenant_entry(tenant, "index-next/index");
    let next = entries
        .get(&next_name)
        .map(|w| master.unwrap(&next_name, w).map(Arc::new))
        .transpose()?;
    let mut data = HashMap::new();
    for version in data_versions(entries, tenant)? {
        let name = tenant_entry(tenant, &format!("data/{version}"));
        let key = master.unwrap(&name, entries.get(&name).ok_or(KeyError::Tampered)?)?;
        let r = reserved.get(&version).copied().unwrap_or(0);
        data.insert(version, Arc::new(DataKey::new(key.aead(), r)));
    }
    if !data.contains_key(&active) {
        return Err(KeyError::Tampered);
    }
    Ok(Some(TenantKeys {
        tenant: tenant.to_string(),
        versions: RwLock::new(Versions { active, data }),
        index: RwLock::new(Index {
            current: Arc::new(index),
            next,
        }),
        record,
        writes: tokio::sync::RwLock::new(()),
    }))
}

/// A key store read from a backup, opened with the master key offline
/// (`backup verify`, `restore`): its tenants' keys unwrapped on demand, and
/// the store re-sealed without the tenants a restore must not bring back.
pub struct KeyringSnapshot {
    master: MasterDerived,
    entries: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for KeyringSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyringSnapshot([redacted])")
    }
}

impl KeyringSnapshot {
    /// Authenticates `bytes` (a key store file) under `master`.
    pub fn open(master: &MasterKey, bytes: &[u8]) -> Result<Self, KeyError> {
        let master = MasterDerived::of(master);
        let entries = master.open_file(bytes)?;
        Ok(Self { master, entries })
    }

    /// The tenants that have keys.
    pub fn tenants(&self) -> Vec<String> {
        self.entries
            .keys()
            .filter_map(|k| k.strip_prefix("tenant/")?.strip_suffix("/active"))
            .map(str::to_string)
            .collect()
    }

    /// The tenants whose keys were shredded (tombstones).
    pub fn shredded(&self) -> Vec<String> {
        self.entries
            .keys()
            .filter_map(|k| k.strip_prefix("shredded/"))
            .map(str::to_string)
            .collect()
    }

    /// A tenant's keys, unwrapped (encryption counts are not needed to
    /// decrypt and read as zero).
    pub fn tenant_keys(&self, tenant: &str) -> Result<Option<TenantKeys>, KeyError> {
        tenant_keys(&self.master, &self.entries, tenant, &HashMap::new())
    }

    /// The audit chain's key.
    pub fn audit_key(&self) -> Result<SecretKey, KeyError> {
        let name = "secret/audit";
        self.master
            .unwrap(name, self.entries.get(name).ok_or(KeyError::Tampered)?)
    }

    /// Checks that every wrapped key opens under the master key.
    pub fn check_all(&self) -> Result<usize, KeyError> {
        let mut n = 0;
        for (name, value) in &self.entries {
            if is_wrapped(name) {
                self.master.unwrap(name, value)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The key store file's bytes without `drop`'s tenants: their keys
    /// gone and a tombstone each, as if shredded here.
    pub fn sealed_without(&self, drop: &[String]) -> Vec<u8> {
        let mut e = self.entries.clone();
        for t in drop {
            let prefix = tenant_entry(t, "");
            e.retain(|k, _| !k.starts_with(&prefix));
            e.insert(format!("shredded/{t}"), Vec::new());
        }
        self.master.seal_file(&e)
    }
}

/// What [`rotate_master`] found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum MasterRotation {
    /// Every wrapped key re-wrapped under the new master key.
    Rotated { keys: usize },
    /// The key store already opens with the new key (a rerun).
    AlreadyDone,
}

/// Whether an entry of the key store is a key wrapped under the master.
fn is_wrapped(name: &str) -> bool {
    name.starts_with("secret/")
        || name.contains("/data/")
        || name.ends_with("/index")
        || name.ends_with("/record")
}

/// The key-store entry naming the record format of the data directory:
/// kept in the authenticated key store, so that no one with write access
/// to the data directory alone can make the vault take records for an
/// older format (and re-seal tampered ones while migrating them).
const RECORD_FORMAT_ENTRY: &str = "format/records";

/// Re-wraps the key store of `data_dir` from the `old` master key to the
/// `new` one: every tenant key, index key and secret (pepper, audit key,
/// budget and honeytoken keys) is unwrapped and wrapped again, and the key
/// check and the store's MAC are recomputed, all in one atomic replace of
/// the file. Killed at any step ([`AtomicFile::replace_steps`];
/// `stop_before` simulates it), the store opens with the old key or the
/// new one; run again, it finishes. Nothing is derived from the master key
/// but the wrapping, check and MAC keys, so the audit chain (its key is a
/// wrapped secret) continues and verifies across the change.
///
/// The caller must hold the data directory (the server stopped).
pub fn rotate_master(
    data_dir: &Path,
    old: &MasterKey,
    new: &MasterKey,
    stop_before: Option<u32>,
) -> Result<MasterRotation, KeyError> {
    let file = AtomicFile::new(data_dir.join(KEYRING_FILE));
    let bytes = file.read()?.ok_or(KeyError::Tampered)?;
    match rewrap_sealed(&bytes, old, new)? {
        None => Ok(MasterRotation::AlreadyDone),
        Some((next, keys)) => {
            file.replace_steps(&next, stop_before)?;
            Ok(MasterRotation::Rotated { keys })
        }
    }
}

/// [`rotate_master`] of the key store row every node shares (postgres), in
/// one transaction. Every node must be stopped: a running one holds the
/// old master key and would refuse the store from then on.
pub fn rotate_master_row(
    row: &crate::store::postgres::KeyStoreRow,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<MasterRotation, KeyError> {
    let (outcome, _) = row.modify(|current| -> Result<_, KeyError> {
        let bytes = current.ok_or(KeyError::Tampered)?;
        Ok(match rewrap_sealed(&bytes, old, new)? {
            None => (bytes, MasterRotation::AlreadyDone),
            Some((next, keys)) => (next, MasterRotation::Rotated { keys }),
        })
    })?;
    Ok(outcome)
}

/// The sealed key store `bytes` re-wrapped from `old` to `new` with how many
/// keys it holds, or `None` if it opens under `new` already.
fn rewrap_sealed(
    bytes: &[u8],
    old: &MasterKey,
    new: &MasterKey,
) -> Result<Option<(Vec<u8>, usize)>, KeyError> {
    let (from, to) = (MasterDerived::of(old), MasterDerived::of(new));
    match to.open_file(bytes) {
        Ok(_) => return Ok(None),
        Err(KeyError::WrongKey) => {}
        Err(e) => return Err(e),
    }
    let entries = from.open_file(bytes)?;
    let mut next = BTreeMap::new();
    let mut keys = 0;
    for (name, value) in entries {
        let value = if name == "check" {
            to.check.to_vec()
        } else if is_wrapped(&name) {
            keys += 1;
            to.wrap(&name, &from.unwrap(&name, &value)?)
        } else {
            value
        };
        next.insert(name, value);
    }
    Ok(Some((to.seal_file(&next), keys)))
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
                reserved: tokio::sync::Mutex::new(count),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledOptions;

    const BOUND: u64 = 1 << 40;

    fn store(dir: &Path) -> Storage {
        Storage::open_sled(
            &dir.join("db"),
            &SledOptions {
                cache_capacity_bytes: 1 << 20,
            },
        )
        .unwrap()
    }

    fn master() -> (MasterKey, MasterKey) {
        let k = SecretKey::random();
        (
            MasterKey(SecretKey::from_slice(k.expose()).unwrap()),
            MasterKey(k),
        )
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
        for refused in [0o644, 0o604, 0o660, 0o670, 0o601] {
            fs::set_permissions(&path, fs::Permissions::from_mode(refused)).unwrap();
            let err = load_key_file(&path).unwrap_err().to_string();
            assert!(err.contains("chmod 600"), "{refused:o}: {err}");
        }
        for ok in [0o400, 0o600] {
            fs::set_permissions(&path, fs::Permissions::from_mode(ok)).unwrap();
            load_key_file(&path).unwrap();
        }
    }

    /// A Secret mounted by Kubernetes with the pod's `fsGroup`: root owns
    /// the file, mode 0440 (defaultMode 0400 plus the group's read bit),
    /// group = the pod's group = the server's own group. Accepted; the
    /// same modes with another group are refused.
    #[test]
    fn a_secret_mounted_with_the_pods_fs_group_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.key");
        generate_key_file(&path).unwrap();
        let me = nix::unistd::getegid();
        let uid = nix::unistd::geteuid();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o440)).unwrap();
        nix::unistd::chown(&path, None, Some(me)).unwrap();
        let members = nix::unistd::Group::from_gid(me)
            .unwrap()
            .map_or(0, |g| g.mem.len());
        if me.as_raw() == 0 {
            // Root's group is never a service's own (running as root here,
            // the accepted case is tested with a real server running as a
            // pod's user: tests/deploy.rs).
            let err = load_key_file(&path).unwrap_err().to_string();
            assert!(err.contains("root's"), "{err}");
        } else if members == 0 {
            load_key_file(&path).expect("0440 with the server's own group");
        }
        if !uid.is_root() {
            eprintln!("*** SKIPPED the other-group half: needs root to chown ***");
            return;
        }
        // Root can give it any group: another group is refused.
        nix::unistd::chown(&path, None, Some(nix::unistd::Gid::from_raw(4242))).unwrap();
        let err = load_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("not the server's own group"), "{err}");
        // Another owner than root or the server is refused too.
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(4242)), Some(me)).unwrap();
        let err = load_key_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("another user") || err.contains("root's"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn wrong_master_key_and_a_modified_store_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (m, m2) = master();
        Keyring::open(s.clone(), KeyHome::in_dir(dir.path()), &m, BOUND)
            .await
            .unwrap();
        let err = Keyring::open(
            s.clone(),
            KeyHome::in_dir(dir.path()),
            &MasterKey(SecretKey::random()),
            BOUND,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, KeyError::WrongKey));
        let path = dir.path().join(KEYRING_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 40] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = Keyring::open(s, KeyHome::in_dir(dir.path()), &m2, BOUND)
            .await
            .unwrap_err();
        assert!(matches!(err, KeyError::Tampered), "{err}");
    }

    #[tokio::test]
    async fn shredded_keys_are_gone_even_for_whoever_still_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (m, _) = master();
        let ring = Keyring::open(s, KeyHome::in_dir(dir.path()), &m, BOUND)
            .await
            .unwrap();
        ring.create_tenant_keys("t").unwrap();
        let held = ring.tenant("t").await.unwrap().unwrap();
        let (a, _) = ring.reserve_encryptions(&held, 1).await.unwrap();
        let sealed = held.encrypt_field(&a, "r", "f", b"v");
        let token = held.index_token("f", "v");
        drop(a);
        ring.shred_tenant("t").await.unwrap();
        assert!(matches!(
            ring.reserve_encryptions(&held, 1).await,
            Err(KeyError::Shredded)
        ));
        assert!(held.decrypt_field("r", "f", &sealed).is_err());
        assert_ne!(held.index_token("f", "v"), token);
        assert!(ring.tenant("t").await.unwrap().is_none());
        assert!(matches!(
            ring.create_tenant_keys("t"),
            Err(KeyError::Shredded)
        ));
    }

    #[tokio::test]
    async fn data_without_its_key_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (m, m2) = master();
        Keyring::open(s.clone(), KeyHome::in_dir(dir.path()), &m, BOUND)
            .await
            .unwrap();
        let mut b = Batch::new();
        b.put(Space::Tenants, b"clinic".to_vec(), Vec::new());
        s.apply(b).await.unwrap();
        fs::remove_file(dir.path().join(KEYRING_FILE)).unwrap();
        let err = Keyring::open(s, KeyHome::in_dir(dir.path()), &m2, BOUND)
            .await
            .unwrap_err();
        assert!(matches!(err, KeyError::MissingStore(_)), "{err}");
        assert!(err.to_string().contains("restore it"));
    }

    #[tokio::test]
    async fn tenant_keys_are_stored_wrapped_and_bound_to_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (m, m2) = master();
        let ring = Keyring::open(s.clone(), KeyHome::in_dir(dir.path()), &m, BOUND)
            .await
            .unwrap();
        ring.create_tenant_keys("a").unwrap();
        ring.create_tenant_keys("b").unwrap();
        let a = ring.tenant("a").await.unwrap().unwrap();
        let b = ring.tenant("b").await.unwrap().unwrap();
        let (active, _) = ring.reserve_encryptions(&a, 1).await.unwrap();
        let sealed = a.encrypt_field(&active, "r1", "nir", b"1850775123456");
        assert_eq!(
            &a.decrypt_field("r1", "nir", &sealed).unwrap()[..],
            b"1850775123456"
        );
        assert!(b.decrypt_field("r1", "nir", &sealed).is_err());
        assert!(ring.tenant("nope").await.unwrap().is_none());
        // Swapping the wrapped keys of two tenants (with a valid file MAC,
        // as an attacker with the master key's MAC key could not) is still
        // caught by the wrapping's AAD.
        let mut e = ring.entries.lock().clone();
        let ka = e["tenant/a/data/1"].clone();
        e.insert("tenant/b/data/1".into(), ka);
        let KeyHome::File(file) = &ring.home else {
            unreachable!("a test key ring lives in a file")
        };
        file.replace(&ring.master.seal_file(&e)).unwrap();
        drop(ring);
        let ring = Keyring::open(s, KeyHome::in_dir(dir.path()), &m2, BOUND)
            .await
            .unwrap();
        assert!(matches!(
            ring.load_tenant("b").await,
            Err(KeyError::Tampered)
        ));
    }

    #[tokio::test]
    async fn encryption_count_is_reserved_durably() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (m, m2) = master();
        let ring = Keyring::open(s.clone(), KeyHome::in_dir(dir.path()), &m, BOUND)
            .await
            .unwrap();
        ring.create_tenant_keys("t").unwrap();
        let k = ring.tenant("t").await.unwrap().unwrap();
        let _ = ring.reserve_encryptions(&k, 10).await.unwrap();
        assert_eq!(k.encryption_counts(), vec![(1, 10)]);
        let ring2 = Keyring::open(s, KeyHome::in_dir(dir.path()), &m2, BOUND)
            .await
            .unwrap();
        let k2 = ring2.tenant("t").await.unwrap().unwrap();
        let after_restart = k2.encryption_counts()[0].1;
        assert!(after_restart >= 10, "a restart never under-counts");
    }

    #[tokio::test]
    async fn rotation_at_the_bound_is_exact_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (m, _) = master();
        let ring = Keyring::open(s.clone(), KeyHome::in_dir(dir.path()), &m, 10)
            .await
            .unwrap();
        ring.create_tenant_keys("t").unwrap();
        let k = ring.tenant("t").await.unwrap().unwrap();
        let (a, rotated) = ring.reserve_encryptions(&k, 4).await.unwrap();
        assert_eq!((a.version(), rotated), (1, None));
        let old = k.encrypt_field(&a, "r", "f", b"v1");
        let (_, rotated) = ring.reserve_encryptions(&k, 6).await.unwrap();
        assert_eq!(rotated, None, "exactly at the bound: still version 1");
        drop(ring);
        // Reopened: the count resumed exactly, so one more rotates.
        let ring = Keyring::open(s.clone(), KeyHome::in_dir(dir.path()), &m, 10)
            .await
            .unwrap();
        let k = ring.tenant("t").await.unwrap().unwrap();
        assert_eq!(k.encryption_counts(), vec![(1, 10)]);
        let (a, rotated) = ring.reserve_encryptions(&k, 1).await.unwrap();
        assert_eq!((a.version(), rotated), (2, Some(2)));
        assert_eq!(k.encryption_counts(), vec![(1, 10), (2, 1)]);
        assert_eq!(&k.decrypt_field("r", "f", &old).unwrap()[..], b"v1");
        assert_eq!(ring.rotate(&k).await.unwrap(), 3);
        let ring = Keyring::open(s, KeyHome::in_dir(dir.path()), &m, 10)
            .await
            .unwrap();
        assert_eq!(ring.tenant("t").await.unwrap().unwrap().active_version(), 3);
    }
}
