//! Tenants: a name, the fields its blind index covers, and its keys.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use parking_lot::RwLock;
use prost::Message;

use crate::{
    clock::now_ms,
    error::{Error, Result},
    keys::{Keyring, TenantKeys},
    model::{FieldName, MAX_FIELDS, TenantName},
    store::{Batch, Space, Storage},
};

#[derive(Clone, PartialEq, Message)]
struct StoredTenant {
    #[prost(string, repeated, tag = "1")]
    indexed_fields: Vec<String>,
    #[prost(int64, tag = "2")]
    created_ms: i64,
}

/// A tenant as the record path needs it: loaded and unwrapped once.
#[derive(Debug)]
pub struct Tenant {
    pub name: TenantName,
    pub indexed: BTreeSet<FieldName>,
    pub keys: Arc<TenantKeys>,
}

pub struct Tenants {
    store: Storage,
    keys: Arc<Keyring>,
    cache: RwLock<HashMap<TenantName, Arc<Tenant>>>,
    /// The key ring's generation the cache was filled at: keys reloaded
    /// (changed by another node) empty it.
    generation: std::sync::atomic::AtomicU64,
}

impl Tenants {
    pub fn new(store: Storage, keys: Arc<Keyring>) -> Self {
        Self {
            store,
            keys,
            cache: RwLock::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub async fn create(&self, name: &TenantName, indexed: &[FieldName]) -> Result<()> {
        if indexed.len() > MAX_FIELDS {
            return Err(Error::InvalidArgument("at most 256 indexed fields".into()));
        }
        if self
            .store
            .get(Space::Tenants, name.as_str().as_bytes())
            .await?
            .is_some()
        {
            return Err(Error::AlreadyExists("tenant already exists".into()));
        }
        let t = StoredTenant {
            indexed_fields: indexed.iter().map(|f| f.to_string()).collect(),
            created_ms: now_ms(),
        };
        // Keys first, durably: a tenant never exists without its keys.
        self.keys.create_tenant_keys(name.as_str())?;
        let mut b = Batch::new();
        b.put(Space::Tenants, name.as_str().as_bytes(), t.encode_to_vec());
        Ok(self.store.commit(b).await?)
    }

    pub async fn exists(&self, name: &TenantName) -> Result<bool> {
        Ok(self.cache.read().contains_key(name)
            || self
                .store
                .get(Space::Tenants, name.as_str().as_bytes())
                .await?
                .is_some())
    }

    /// The names of every stored tenant.
    pub async fn names(&self) -> Result<Vec<TenantName>> {
        self.store
            .scan_prefix(Space::Tenants, b"", usize::MAX)
            .await?
            .into_iter()
            .map(|(k, _)| {
                std::str::from_utf8(&k)
                    .ok()
                    .and_then(|n| TenantName::parse(n).ok())
                    .ok_or(Error::DataLoss)
            })
            .collect()
    }

    /// Deletes the tenant's entry (after its keys were shredded).
    pub async fn delete(&self, name: &TenantName) -> Result<()> {
        self.cache.write().remove(name);
        let mut b = Batch::new();
        b.delete(Space::Tenants, name.as_str().as_bytes());
        Ok(self.store.commit(b).await?)
    }

    /// The tenant with its keys, or NOT_FOUND (also once shredded).
    pub async fn get(&self, name: &TenantName) -> Result<Arc<Tenant>> {
        // Nodes on one database: keys another node rotated, retired or
        // shredded are used here from this call on.
        self.keys.follow().await?;
        let generation = self.keys.generation();
        if self
            .generation
            .swap(generation, std::sync::atomic::Ordering::SeqCst)
            != generation
        {
            self.cache.write().clear();
        }
        if let Some(t) = self.cache.read().get(name) {
            return Ok(t.clone());
        }
        let bytes = self
            .store
            .get(Space::Tenants, name.as_str().as_bytes())
            .await?
            .ok_or(Error::NotFound)?;
        let st = StoredTenant::decode(&bytes[..])?;
        let indexed = st
            .indexed_fields
            .iter()
            .map(|f| FieldName::parse(f).map_err(|_| Error::DataLoss))
            .collect::<Result<_>>()?;
        let keys = match self.keys.tenant(name.as_str()).await? {
            Some(k) => k,
            // Shredded, the entry not yet deleted (a crash mid-shred).
            None if self.keys.is_shredded(name.as_str()) => return Err(Error::NotFound),
            None => return Err(Error::DataLoss),
        };
        let t = Arc::new(Tenant {
            name: name.clone(),
            indexed,
            keys,
        });
        self.cache.write().insert(name.clone(), t.clone());
        Ok(t)
    }
}
