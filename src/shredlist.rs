//! The shred list: the tenants whose keys were destroyed, kept beside the
//! master key file, outside the data directory and outside every backup.
//!
//! Crypto-shredding destroys a tenant's keys in the key store, but a backup
//! taken before holds the key store as it was, and restoring it would bring
//! the tenant back. The list travels with the master key instead (it is
//! needed with it, and escrowed with it): every open of a data directory and
//! every restore checks it, and a listed tenant's keys and data are
//! destroyed again wherever they come from (a restored backup, a copy of the
//! data directory, a PostgreSQL base backup). Only `coffre restore
//! --restore-shredded TENANT --reason TEXT` (a court order) takes a tenant
//! off the list, and that is audited; the list keeps a line saying so, so
//! that the number of tenants it ever named never goes down.
//!
//! The file is text, one tenant per line with the time it was shredded
//! (and, once taken off, when), then an HMAC-SHA-256 line over everything
//! before it under a key derived from the master key: an edit is refused
//! (never read as "no tenant was shredded"). A MAC stops edits, not a
//! rollback to an older authentic list, and whoever holds the master key
//! can make a new one: the threat model says so. `keygen` creates the list
//! empty beside the key it writes, so every vault has one; the list of an
//! earlier release (a plain SHA-256 line) is read once and rewritten under
//! the MAC. It names tenants, which the data directory names too; it holds
//! no key. Created 0600, replaced atomically.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    crypto::{self, SecretKey},
    store::{AtomicFile, StorageError},
};

const MAGIC_V1: &str = "coffre-shred-list-v1";
const MAGIC: &str = "coffre-shred-list-v2";

/// Why the shred list could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ShredListError {
    #[error(
        "shred list {0} is damaged or was edited (its MAC fails, or it was made under another master key): put back the copy escrowed with the master key"
    )]
    Damaged(String),
    #[error("shred list {0}: {1}")]
    Io(String, String),
}

impl From<ShredListError> for StorageError {
    fn from(e: ShredListError) -> Self {
        StorageError::Io(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listed {
    at: i64,
    /// Taken off the list (a court order) at this time.
    restored_at: Option<i64>,
}

/// The tenants shredded under a master key, with when.
#[derive(Clone)]
pub struct ShredList {
    file: AtomicFile,
    key: Arc<SecretKey>,
    tenants: BTreeMap<String, Listed>,
    /// The file was there when loaded.
    existed: bool,
    /// The file was in the unauthenticated format of an earlier release.
    legacy: bool,
}

impl std::fmt::Debug for ShredList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShredList")
            .field("path", &self.file.path())
            .field("entries", &self.tenants.len())
            .finish()
    }
}

/// Where the shred list of a master key file lives when the config does not
/// say: beside it, `<master_key_file>.shredded`.
pub fn default_path(master_key_file: &Path) -> PathBuf {
    let mut name = master_key_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".shredded");
    master_key_file.with_file_name(name)
}

impl ShredList {
    /// Reads the list at `path` under the MAC key `key` (derived from the
    /// master key); a missing file reads as empty ([`ShredList::existed`]
    /// says which).
    pub fn load(path: &Path, key: SecretKey) -> Result<Self, ShredListError> {
        let shown = path.display().to_string();
        let damaged = || ShredListError::Damaged(shown.clone());
        let file = AtomicFile::new(path);
        let bytes = file
            .read()
            .map_err(|e| ShredListError::Io(shown.clone(), e.to_string()))?;
        let mut list = Self {
            file,
            key: Arc::new(key),
            tenants: BTreeMap::new(),
            existed: bytes.is_some(),
            legacy: false,
        };
        let Some(bytes) = bytes else {
            return Ok(list);
        };
        let text = String::from_utf8(bytes).map_err(|_| damaged())?;
        let (body, sum) = text
            .trim_end_matches('\n')
            .rsplit_once('\n')
            .ok_or_else(damaged)?;
        let body = format!("{body}\n");
        let mut lines = body.lines();
        match lines.next() {
            Some(MAGIC) => {
                let mac = sum.strip_prefix("hmac-sha256 ").ok_or_else(damaged)?;
                let want = hex::encode(list.mac_of(&body));
                if !crypto::ct_eq(mac.as_bytes(), want.as_bytes()) {
                    return Err(damaged());
                }
            }
            Some(MAGIC_V1) => {
                let want = format!("sha256 {}", hex::encode(crypto::sha256(body.as_bytes())));
                if sum != want {
                    return Err(damaged());
                }
                list.legacy = true;
            }
            _ => return Err(damaged()),
        }
        for line in lines {
            let mut parts = line.split('\t');
            let name = parts.next().filter(|n| !n.is_empty()).ok_or_else(damaged)?;
            let at = parts
                .next()
                .and_then(|a| a.parse().ok())
                .ok_or_else(damaged)?;
            let restored_at = match parts.next() {
                None => None,
                Some(r) => Some(
                    r.strip_prefix("restored=")
                        .and_then(|r| r.parse().ok())
                        .ok_or_else(damaged)?,
                ),
            };
            if parts.next().is_some() {
                return Err(damaged());
            }
            list.tenants
                .insert(name.to_string(), Listed { at, restored_at });
        }
        Ok(list)
    }

    /// An empty list at `path` that was not read (a restore told to run
    /// without the list): nothing is written unless a tenant is added.
    pub fn unread(path: &Path, key: SecretKey) -> Self {
        Self {
            file: AtomicFile::new(path),
            key: Arc::new(key),
            tenants: BTreeMap::new(),
            existed: false,
            legacy: false,
        }
    }

    /// Writes an empty list at `path`, never over an existing file (beside
    /// a new master key: `keygen`).
    pub fn create_empty(path: &Path, key: SecretKey) -> Result<(), ShredListError> {
        let shown = path.display().to_string();
        if path.exists() {
            return Err(ShredListError::Io(
                shown,
                "a shred list is there already (of an earlier key?): move it away first".into(),
            ));
        }
        let list = Self::load(path, key)?;
        list.write(&list.tenants)
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Whether the file was there when loaded.
    pub fn existed(&self) -> bool {
        self.existed
    }

    /// Whether the file was in the unauthenticated format of an earlier
    /// release (see [`ShredList::save`]).
    pub fn legacy(&self) -> bool {
        self.legacy
    }

    /// Whether `tenant` is shredded (listed, and not taken off).
    pub fn contains(&self, tenant: &str) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|l| l.restored_at.is_none())
    }

    /// The shredded tenants, with when each was shredded (unix ms).
    pub fn tenants(&self) -> impl Iterator<Item = (&str, i64)> {
        self.tenants
            .iter()
            .filter(|(_, l)| l.restored_at.is_none())
            .map(|(k, l)| (k.as_str(), l.at))
    }

    /// How many tenants the list ever named (those taken off count): it
    /// only grows, so a list with fewer than a backup's manifest says is
    /// older than that backup.
    pub fn count(&self) -> u64 {
        self.tenants.len() as u64
    }

    /// The MAC of the list as it stands (a backup's manifest keeps it).
    pub fn mac(&self) -> [u8; 32] {
        self.mac_of(&body(&self.tenants))
    }

    fn mac_of(&self, body: &str) -> [u8; 32] {
        crypto::hmac_sha256(&self.key, body.as_bytes())
    }

    /// Writes the list as it stands, under the MAC (creates a missing one,
    /// rewrites one of an earlier release).
    pub fn save(&mut self) -> Result<(), ShredListError> {
        self.write(&self.tenants)?;
        self.existed = true;
        self.legacy = false;
        Ok(())
    }

    /// The same list under another MAC key (a new master key), written at
    /// `path`; merged into what a list there (under that key) holds, or
    /// over this very list when `path` is its own.
    pub fn rekeyed(&self, path: &Path, key: SecretKey) -> Result<Self, ShredListError> {
        let mut next = if path == self.path() {
            Self::unread(path, key)
        } else {
            Self::load(path, key)?
        };
        for (name, l) in &self.tenants {
            next.tenants.entry(name.clone()).or_insert(*l);
        }
        next.save()?;
        Ok(next)
    }

    /// Lists `tenant`, durably (before its keys are destroyed).
    pub fn add(&mut self, tenant: &str, at_unix_ms: i64) -> Result<(), ShredListError> {
        if self.contains(tenant) {
            return Ok(());
        }
        let mut next = self.tenants.clone();
        next.insert(
            tenant.to_string(),
            Listed {
                at: at_unix_ms,
                restored_at: None,
            },
        );
        self.write(&next)?;
        self.tenants = next;
        Ok(())
    }

    /// Takes `tenant` off the list (the audited court-order override); the
    /// line stays, marked.
    pub fn remove(&mut self, tenant: &str) -> Result<(), ShredListError> {
        if !self.contains(tenant) {
            return Ok(());
        }
        let mut next = self.tenants.clone();
        if let Some(l) = next.get_mut(tenant) {
            l.restored_at = Some(crate::clock::now_ms());
        }
        self.write(&next)?;
        self.tenants = next;
        Ok(())
    }

    fn write(&self, tenants: &BTreeMap<String, Listed>) -> Result<(), ShredListError> {
        let mut text = body(tenants);
        let mac = hex::encode(self.mac_of(&text));
        text.push_str(&format!("hmac-sha256 {mac}\n"));
        self.file
            .replace(text.as_bytes())
            .map_err(|e| ShredListError::Io(self.path().display().to_string(), e.to_string()))
    }
}

fn body(tenants: &BTreeMap<String, Listed>) -> String {
    let mut body = format!("{MAGIC}\n");
    for (name, l) in tenants {
        match l.restored_at {
            None => body.push_str(&format!("{name}\t{}\n", l.at)),
            Some(r) => body.push_str(&format!("{name}\t{}\trestored={r}\n", l.at)),
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_slice(&[b; crypto::KEY_LEN]).unwrap()
    }

    #[test]
    fn a_list_survives_a_reload_and_edits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path(&dir.path().join("master.key"));
        assert!(path.ends_with("master.key.shredded"));
        let mut l = ShredList::load(&path, key(1)).unwrap();
        assert!(!l.existed() && !l.contains("ward"));
        l.add("ward", 42).unwrap();
        l.add("clinic", 43).unwrap();
        let l2 = ShredList::load(&path, key(1)).unwrap();
        assert!(l2.existed() && l2.contains("ward") && l2.contains("clinic"));
        assert_eq!(l2.tenants().count(), 2);
        assert_eq!(l2.mac(), l.mac());
        // Another master key's list does not check.
        assert!(matches!(
            ShredList::load(&path, key(2)),
            Err(ShredListError::Damaged(_))
        ));
        // A line deleted: refused, even with a checksum made anew.
        let text = std::fs::read_to_string(&path).unwrap();
        let cut: String =
            text.lines()
                .filter(|l| !l.starts_with("ward"))
                .fold(String::new(), |mut s, l| {
                    s.push_str(l);
                    s.push('\n');
                    s
                });
        std::fs::write(&path, &cut).unwrap();
        assert!(matches!(
            ShredList::load(&path, key(1)),
            Err(ShredListError::Damaged(_))
        ));
        std::fs::write(&path, text).unwrap();
        // A court order takes one off; the count stays.
        let mut l3 = ShredList::load(&path, key(1)).unwrap();
        l3.remove("ward").unwrap();
        let l4 = ShredList::load(&path, key(1)).unwrap();
        assert!(!l4.contains("ward") && l4.contains("clinic"));
        assert_eq!(l4.count(), 2);
    }

    #[test]
    fn an_earlier_releases_list_is_read_once_then_rewritten_under_the_mac() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.shredded");
        let body = format!("{MAGIC_V1}\nward\t42\n");
        let sum = hex::encode(crypto::sha256(body.as_bytes()));
        std::fs::write(&path, format!("{body}sha256 {sum}\n")).unwrap();
        let mut l = ShredList::load(&path, key(1)).unwrap();
        assert!(l.legacy() && l.contains("ward"));
        l.save().unwrap();
        let l = ShredList::load(&path, key(1)).unwrap();
        assert!(!l.legacy() && l.contains("ward"));
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("hmac-sha256 ")
        );
    }
}
