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
//! off the list, and that is audited.
//!
//! The file is text, one tenant per line with the time it was shredded,
//! then a SHA-256 line over everything before it: damage is refused (never
//! read as "no tenant was shredded"). It names tenants, which the data
//! directory names too; it holds no key. Created 0600, replaced atomically.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::store::{AtomicFile, StorageError};

const MAGIC: &str = "coffre-shred-list-v1";

/// Why the shred list could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ShredListError {
    #[error(
        "shred list {0} is damaged (its checksum fails): put back the copy escrowed with the master key"
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

/// The tenants shredded under a master key, with when.
#[derive(Debug, Clone)]
pub struct ShredList {
    file: AtomicFile,
    tenants: BTreeMap<String, i64>,
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
    /// Reads the list at `path` (none yet: empty).
    pub fn load(path: &Path) -> Result<Self, ShredListError> {
        let shown = path.display().to_string();
        let file = AtomicFile::new(path);
        let bytes = file
            .read()
            .map_err(|e| ShredListError::Io(shown.clone(), e.to_string()))?;
        let mut tenants = BTreeMap::new();
        if let Some(bytes) = bytes {
            let text =
                String::from_utf8(bytes).map_err(|_| ShredListError::Damaged(shown.clone()))?;
            let (body, sum) = text
                .trim_end_matches('\n')
                .rsplit_once('\n')
                .ok_or_else(|| ShredListError::Damaged(shown.clone()))?;
            let body = format!("{body}\n");
            let want = format!(
                "sha256 {}",
                hex::encode(crate::crypto::sha256(body.as_bytes()))
            );
            if sum != want {
                return Err(ShredListError::Damaged(shown));
            }
            let mut lines = body.lines();
            if lines.next() != Some(MAGIC) {
                return Err(ShredListError::Damaged(shown));
            }
            for line in lines {
                let (name, at) = line
                    .split_once('\t')
                    .ok_or_else(|| ShredListError::Damaged(shown.clone()))?;
                let at = at
                    .parse()
                    .map_err(|_| ShredListError::Damaged(shown.clone()))?;
                tenants.insert(name.to_string(), at);
            }
        }
        Ok(Self { file, tenants })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn contains(&self, tenant: &str) -> bool {
        self.tenants.contains_key(tenant)
    }

    /// The listed tenants, with when each was shredded (unix ms).
    pub fn tenants(&self) -> impl Iterator<Item = (&str, i64)> {
        self.tenants.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Lists `tenant`, durably (before its keys are destroyed).
    pub fn add(&mut self, tenant: &str, at_unix_ms: i64) -> Result<(), ShredListError> {
        if self.tenants.contains_key(tenant) {
            return Ok(());
        }
        let mut next = self.tenants.clone();
        next.insert(tenant.to_string(), at_unix_ms);
        self.write(&next)?;
        self.tenants = next;
        Ok(())
    }

    /// Takes `tenant` off the list (the audited court-order override).
    pub fn remove(&mut self, tenant: &str) -> Result<(), ShredListError> {
        if !self.tenants.contains_key(tenant) {
            return Ok(());
        }
        let mut next = self.tenants.clone();
        next.remove(tenant);
        self.write(&next)?;
        self.tenants = next;
        Ok(())
    }

    fn write(&self, tenants: &BTreeMap<String, i64>) -> Result<(), ShredListError> {
        let mut body = format!("{MAGIC}\n");
        for (name, at) in tenants {
            body.push_str(&format!("{name}\t{at}\n"));
        }
        let sum = hex::encode(crate::crypto::sha256(body.as_bytes()));
        body.push_str(&format!("sha256 {sum}\n"));
        self.file
            .replace(body.as_bytes())
            .map_err(|e| ShredListError::Io(self.path().display().to_string(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_survives_a_reload_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path(&dir.path().join("master.key"));
        assert!(path.ends_with("master.key.shredded"));
        let mut l = ShredList::load(&path).unwrap();
        assert!(!l.contains("ward"));
        l.add("ward", 42).unwrap();
        l.add("clinic", 43).unwrap();
        let l2 = ShredList::load(&path).unwrap();
        assert!(l2.contains("ward") && l2.contains("clinic"));
        assert_eq!(l2.tenants().count(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("ward", "wart")).unwrap();
        assert!(matches!(
            ShredList::load(&path),
            Err(ShredListError::Damaged(_))
        ));
        std::fs::write(&path, text).unwrap();
        let mut l3 = ShredList::load(&path).unwrap();
        l3.remove("ward").unwrap();
        assert!(!ShredList::load(&path).unwrap().contains("ward"));
    }
}
