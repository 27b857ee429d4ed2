//! Nodes that share one database (`storage.backend = "postgres"`): what
//! they agree on and how each follows the others.
//!
//! - Each node has a random id and writes a heartbeat (`Meta`
//!   `node\0<id>`) every second.
//! - The read budgets' limits are one policy: the first node stores its
//!   `[limits]`; a node started with other limits while another node is
//!   alive refuses to start, naming the first difference. Started when no
//!   node is alive, its limits become the vault's (how an operator changes
//!   them: stop every node, change every config, start again).
//! - A key job (rewrap, reindex) holds a lease (`Meta` `lease\0<tenant>`),
//!   renewed at every step: one node runs it; if that node dies, another
//!   takes the expired lease and resumes the job from its stored cursor.
//! - Once a second a node re-reads what other nodes may have changed: the
//!   key store's version (a rotation there is used here for the next
//!   write), the honeytokens, the trail's head (backwards: stop), and every
//!   ten seconds the schema's version and the database's clock.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message;

use crate::{
    clock::now_ms,
    config::{Config, LimitsConfig},
    error::{Error, Result},
    model::TenantName,
    store::{Batch, Space, StorageError},
    vault::Vault,
};

/// How long a node is taken for alive after its last heartbeat.
const ALIVE_MS: i64 = 10_000;
/// How long a key job's lease lasts unless renewed (a step renews it).
pub const LEASE_MS: i64 = 15_000;

/// This node, among the others on the database.
pub struct Node {
    pub id: [u8; 16],
    pub backend: Arc<crate::store::PostgresBackend>,
}

/// A key job's lease: who holds it and until when.
#[derive(Clone, PartialEq, Message)]
struct Lease {
    #[prost(bytes = "vec", tag = "1")]
    node: Vec<u8>,
    #[prost(int64, tag = "2")]
    until_ms: i64,
}

fn heartbeat_key(id: &[u8]) -> Vec<u8> {
    [b"node\0".as_slice(), id].concat()
}

fn lease_key(tenant: &TenantName) -> Vec<u8> {
    [b"lease\0".as_slice(), tenant.as_str().as_bytes()].concat()
}

/// Every budget limit of `config`, flattened (`limits.clinician.read_burst`
/// → `40`), for comparing nodes.
pub fn limits_of(config: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut add = |at: String, l: &LimitsConfig| {
        let v = serde_json::to_value(l).unwrap_or_default();
        if let Some(m) = v.as_object() {
            for (k, v) in m {
                if !v.is_null() {
                    out.insert(format!("{at}.{k}"), v.to_string());
                }
            }
        }
    };
    for (role, l) in &config.limits {
        add(format!("limits.{role}"), l);
    }
    for (tenant, t) in &config.tenants {
        for (role, l) in &t.limits {
            add(format!("tenants.{tenant}.limits.{role}"), l);
        }
    }
    out
}

/// The first key whose value differs between `here` and `stored`.
fn first_difference(
    here: &BTreeMap<String, String>,
    stored: &BTreeMap<String, String>,
) -> Option<String> {
    let keys: std::collections::BTreeSet<&String> = here.keys().chain(stored.keys()).collect();
    keys.into_iter().find_map(|k| {
        let (a, b) = (here.get(k), stored.get(k));
        (a != b).then(|| {
            format!(
                "{k} is {} here and {} on the other nodes",
                a.map_or("unset", String::as_str),
                b.map_or("unset", String::as_str)
            )
        })
    })
}

impl Node {
    /// Joins the database: checks this node's limits against the vault's
    /// (refusing to start on a difference while another node is alive)
    /// and writes a first heartbeat.
    pub async fn join(
        vault_store: &crate::store::Storage,
        backend: Arc<crate::store::PostgresBackend>,
        config: &Config,
    ) -> Result<Self> {
        let id = crate::crypto::random_array::<16>();
        let here = limits_of(config);
        let encoded = serde_json::to_vec(&here).map_err(|e| Error::Internal(e.to_string()))?;
        for _ in 0..64 {
            let raw = vault_store.get(Space::Meta, b"limits").await?;
            if let Some(raw) = &raw {
                let stored: BTreeMap<String, String> =
                    serde_json::from_slice(raw).map_err(|_| Error::DataLoss)?;
                if stored == here {
                    break;
                }
                if let Some(diff) = first_difference(&here, &stored)
                    && alive_nodes(vault_store).await? > 0
                {
                    return Err(Error::FailedPrecondition(format!(
                        "[limits] differ from the running nodes': {diff}; give every node the same limits (to change them, stop every node first)"
                    )));
                }
                tracing::warn!("no other node alive: this node's [limits] become the vault's");
            }
            let mut b = Batch::new();
            b.expect(Space::Meta, b"limits".to_vec(), raw);
            b.put(Space::Meta, b"limits".to_vec(), encoded.clone());
            match vault_store.commit(b).await {
                Ok(()) => break,
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let node = Self { id, backend };
        node.heartbeat(vault_store).await?;
        Ok(node)
    }

    async fn heartbeat(&self, store: &crate::store::Storage) -> Result<()> {
        let mut b = Batch::new();
        b.put(
            Space::Meta,
            heartbeat_key(&self.id),
            now_ms().to_be_bytes().to_vec(),
        );
        Ok(store.apply(b).await?)
    }

    /// Leaves: the heartbeat goes, so that a restart with new limits is
    /// not refused for this node.
    pub async fn leave(&self, store: &crate::store::Storage) {
        let mut b = Batch::new();
        b.delete(Space::Meta, heartbeat_key(&self.id));
        let _ = store.apply(b).await;
    }

    /// Takes (or renews) the lease on `tenant`'s key job. `Ok(false)`: a
    /// live node holds it.
    pub async fn take_lease(
        &self,
        store: &crate::store::Storage,
        tenant: &TenantName,
    ) -> Result<bool> {
        let key = lease_key(tenant);
        for _ in 0..64 {
            let raw = store.get(Space::Meta, &key).await?;
            if let Some(raw) = &raw {
                let l = Lease::decode(&raw[..])?;
                if l.node != self.id && l.until_ms > now_ms() {
                    return Ok(false);
                }
            }
            let mut b = Batch::new();
            b.expect(Space::Meta, key.clone(), raw);
            b.put(
                Space::Meta,
                key.clone(),
                Lease {
                    node: self.id.to_vec(),
                    until_ms: now_ms() + LEASE_MS,
                }
                .encode_to_vec(),
            );
            match store.commit(b).await {
                Ok(()) => return Ok(true),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Gives the lease back at the end of a job.
    pub async fn release_lease(&self, store: &crate::store::Storage, tenant: &TenantName) {
        let key = lease_key(tenant);
        if let Ok(Some(raw)) = store.get(Space::Meta, &key).await
            && Lease::decode(&raw[..]).is_ok_and(|l| l.node == self.id)
        {
            let mut b = Batch::new();
            b.expect(Space::Meta, key.clone(), Some(raw));
            b.delete(Space::Meta, key);
            let _ = store.commit(b).await;
        }
    }
}

/// Nodes whose heartbeat is recent.
pub async fn alive_nodes(store: &crate::store::Storage) -> Result<usize> {
    let now = now_ms();
    let mut n = 0;
    store
        .scan_each(Space::Meta, b"node\0", |_, v| {
            if v.try_into()
                .map(i64::from_be_bytes)
                .is_ok_and(|t| now - t < ALIVE_MS)
            {
                n += 1;
            }
            true
        })
        .await?;
    Ok(n)
}

/// Once a second: follows what other nodes changed, and resumes the key
/// jobs of nodes that died. Runs until the vault is dropped.
pub async fn follow(vault: std::sync::Weak<Vault>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        let Some(v) = vault.upgrade() else { return };
        if let Err(e) = v.follow_other_nodes(n).await {
            tracing::warn!(error = %e, "following the other nodes failed (retried every second)");
        }
        n += 1;
    }
}

impl Vault {
    /// One round of [`follow`].
    async fn follow_other_nodes(self: &Arc<Self>, n: u64) -> Result<()> {
        let Some(node) = &self.node else {
            return Ok(());
        };
        node.heartbeat(&self.store).await?;
        if n.is_multiple_of(10) {
            node.backend.check_schema().await?;
            node.backend.sync_clock().await?;
        }
        self.keys.follow().await?;
        self.honeytokens.reload().await?;
        let audit = self.audit.clone();
        tokio::task::spawn_blocking(move || audit.check_head())
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        if n.is_multiple_of(5) {
            self.resume_orphaned_jobs().await?;
        }
        Ok(())
    }

    /// Key jobs left with a stored cursor and no live lease (their node
    /// died): this node takes them over, in the background.
    async fn resume_orphaned_jobs(self: &Arc<Self>) -> Result<()> {
        let mut found = Vec::new();
        for name in ["rewrap", "reindex"] {
            let prefix = [name.as_bytes(), b"\0"].concat();
            self.store
                .scan_each(Space::Meta, &prefix, |k, _| {
                    if let Ok(t) = std::str::from_utf8(&k[prefix.len()..])
                        && let Ok(t) = TenantName::parse(t)
                    {
                        found.push((name, t));
                    }
                    true
                })
                .await?;
        }
        for (name, tenant) in found {
            if self.job_running_here(&tenant) {
                continue;
            }
            let raw = self.store.get(Space::Meta, &lease_key(&tenant)).await?;
            let held = raw
                .as_deref()
                .map(Lease::decode)
                .transpose()?
                .is_some_and(|l| l.until_ms > now_ms());
            if held {
                continue;
            }
            let v = self.clone();
            tokio::spawn(async move {
                let r = v.resume_job(name, &tenant).await;
                match r {
                    Ok(()) => {
                        tracing::warn!(job = name, tenant = %tenant, "resumed a key job whose node stopped; done")
                    }
                    Err(e) => {
                        tracing::warn!(job = name, tenant = %tenant, error = %e, "resuming a key job")
                    }
                }
            });
        }
        Ok(())
    }
}
