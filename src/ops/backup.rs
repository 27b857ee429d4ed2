//! Backups of a running vault: the consistent cut, the manifest and the
//! stream (`Admin/Backup`), and the backups the server writes on its own
//! into `backup.dir`.

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use super::OpsError;
use crate::{
    audit::TrailSnapshot,
    backup::{Manifest, SpaceCount, TenantCounts, Writer},
    store::{Cut, Space},
    vault::Vault,
};

/// The key spaces a backup holds: every one but sessions (after a restore
/// everyone logs in again) and the unused `Keys`.
pub const BACKED_UP: &[Space] = &[
    Space::Meta,
    Space::Tenants,
    Space::Principals,
    Space::Records,
    Space::Index,
    Space::Secrets,
    Space::Counters,
    Space::Audit,
    Space::Budgets,
    Space::Honeytokens,
    Space::TrailRetained,
];

/// The space a stored byte names, among those a backup holds.
pub fn backed_up_space(b: u8) -> Option<Space> {
    BACKED_UP.iter().copied().find(|s| *s as u8 == b)
}

/// A backup whose instant is fixed (the cut is open), ready to stream.
pub struct Started {
    cut: Cut,
    trail: TrailSnapshot,
    keyring: Vec<u8>,
    manifest: Manifest,
    root: crate::crypto::SecretKey,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("audit_head_seq", &self.manifest.audit_head_seq)
            .finish_non_exhaustive()
    }
}

/// Takes the cut: once the writing calls in flight have finished (new ones
/// wait), writes are held while the trail's head and the key store are
/// captured, then the vault serves again while the cut is read. Then counts
/// what the cut holds, for the manifest.
pub async fn start(vault: &Vault) -> Result<Started, OpsError> {
    // Refused before any write is held where the trail cannot be copied.
    drop(vault.audit.snapshot()?);
    let (cut, (trail, keyring)) = vault
        .store
        .cut_between_calls(|| (vault.audit.snapshot(), vault.keys.sealed_bytes()))
        .await?;
    let trail = trail?;
    tracing::info!(
        held_us = cut.held().as_micros() as u64,
        audit_head_seq = trail.head_seq,
        "backup: consistent cut taken"
    );
    let mut tenants: BTreeMap<String, TenantCounts> = BTreeMap::new();
    let mut spaces = Vec::new();
    let mut bytes = keyring.len() as u64 + trail.bytes();
    for &space in BACKED_UP {
        let mut n = 0u64;
        cut.scan(space, b"", |k, v| {
            n += 1;
            bytes += (k.len() + v.len() + 13) as u64;
            if let Some(t) = tenant_counts(&mut tenants, space, k) {
                match space {
                    Space::Records => t.records += 1,
                    Space::Principals => t.principals += 1,
                    Space::Secrets => t.secrets += 1,
                    Space::Index => t.index_entries += 1,
                    _ => {}
                }
            }
            true
        })
        .await?;
        spaces.push(SpaceCount {
            space: space as u32,
            entries: n,
        });
    }
    let manifest = Manifest {
        created_unix_ms: crate::clock::now_ms(),
        coffre_version: env!("CARGO_PKG_VERSION").into(),
        backend: "sled".into(),
        key_check: vault.keys.key_check().to_vec(),
        audit_head_seq: trail.head_seq,
        audit_head_hash: trail.head_hash.to_vec(),
        audit_first_seq: trail.first_seq(),
        tenants: tenants.into_values().collect(),
        spaces,
        bytes,
        shred_list_count: vault.keys.shred_list_state().map(|(n, _)| n),
        shred_list_mac: vault
            .keys
            .shred_list_state()
            .map(|(_, mac)| mac.to_vec())
            .unwrap_or_default(),
        ..Default::default()
    };
    let root = crate::crypto::SecretKey::from_slice(vault.keys.backup_root().expose())
        .expect("backup root is KEY_LEN bytes");
    Ok(Started {
        cut,
        trail,
        keyring,
        manifest,
        root,
    })
}

/// The counts of the tenant a key of `space` belongs to (`Tenants` keys
/// are names; the per-tenant spaces start with `tenant\0`).
pub fn tenant_counts<'a>(
    tenants: &'a mut BTreeMap<String, TenantCounts>,
    space: Space,
    key: &[u8],
) -> Option<&'a mut TenantCounts> {
    let end = match space {
        Space::Tenants => key.len(),
        Space::Records | Space::Principals | Space::Secrets | Space::Index => {
            key.iter().position(|b| *b == 0)?
        }
        _ => return None,
    };
    let name = String::from_utf8_lossy(&key[..end]).into_owned();
    Some(tenants.entry(name.clone()).or_insert_with(|| TenantCounts {
        name,
        ..Default::default()
    }))
}

/// The client or file went away mid-stream.
fn gone() -> OpsError {
    OpsError::Refused("backup stream closed by its reader".into())
}

impl Started {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// How long writes were held for the cut.
    pub fn held(&self) -> Duration {
        self.cut.held()
    }

    /// Streams the backup file's bytes into `sink`, a chunk at a time: the
    /// reader's pace bounds the memory. Returns the manifest written.
    pub async fn stream(self, sink: &mpsc::Sender<Vec<u8>>) -> Result<Manifest, OpsError> {
        let Started {
            cut,
            trail,
            keyring,
            manifest,
            root,
        } = self;
        let mut w = Writer::new(&root, manifest.clone());
        w.keyring(&keyring);
        for &space in BACKED_UP {
            let mut chunks = cut.chunks(space, b"");
            loop {
                let started = std::time::Instant::now();
                let Some(rows) = chunks.next().await? else {
                    break;
                };
                for (k, v) in rows {
                    w.store(space as u8, &k, &v);
                }
                let worked = started.elapsed();
                while let Some(p) = w.take() {
                    sink.send(p).await.map_err(|_| gone())?;
                }
                // Paced like a key job: as long asleep as at work, so that
                // the backup takes at most half a core and reads keep
                // their latency.
                pace(worked).await;
            }
        }
        drop(cut);
        // The trail's files are read on a blocking thread, frame by frame.
        let tx = sink.clone();
        let w = tokio::task::spawn_blocking(move || {
            let mut worked = Duration::ZERO;
            trail.export(|header, raw| {
                let started = std::time::Instant::now();
                if header {
                    w.trail_segment(&raw);
                } else {
                    w.trail_frame(&raw);
                }
                worked += started.elapsed();
                while let Some(p) = w.take() {
                    tx.blocking_send(p)
                        .map_err(|_| crate::store::StorageError::Closed)?;
                    std::thread::sleep(std::mem::take(&mut worked));
                }
                Ok(())
            })?;
            Ok::<_, crate::store::StorageError>(w)
        })
        .await
        .map_err(|e| OpsError::Refused(format!("backup trail reader: {e}")))?
        .map_err(|e| match e {
            crate::store::StorageError::Closed => gone(),
            e => e.into(),
        })?;
        for p in w.finish() {
            sink.send(p).await.map_err(|_| gone())?;
        }
        Ok(manifest)
    }
}

/// Sleeps as long as `worked`, at least a millisecond (a step's work
/// measured with its wait for the disk).
async fn pace(worked: Duration) {
    tokio::time::sleep(worked.max(Duration::from_millis(1))).await;
}

/// The file name of a scheduled backup made at `ms`: sorts by time.
fn file_name(ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    format!("coffre-{}.backup", t.format("%Y%m%dT%H%M%S%.3fZ"))
}

/// What a scheduled backup wrote.
#[derive(Debug)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: u64,
    pub manifest: Manifest,
    /// Older backups removed to keep `backup.keep`.
    pub removed: usize,
}

/// Writes one backup into `dir`: streamed into a temporary file (0600),
/// fsynced, renamed into place, the directory fsynced; then only the last
/// `keep` backups of `dir` are kept. A failure leaves no file that looks
/// like a backup (the temporary one is removed).
pub async fn write_to_dir(vault: &Arc<Vault>, dir: &Path, keep: u32) -> Result<Written, OpsError> {
    let io = |what: &str, e: std::io::Error| {
        OpsError::Refused(format!("backup.dir {}: {what}: {e}", dir.display()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("create", e))?;
    let started = start(vault).await?;
    let name = file_name(started.manifest().created_unix_ms);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.partial"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::task::spawn_blocking(move || {
        let mut n = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            file.write_all(&chunk)?;
            n += chunk.len() as u64;
        }
        file.sync_all()?;
        Ok::<u64, std::io::Error>(n)
    });
    let streamed = started.stream(&tx).await;
    drop(tx);
    let wrote = writer
        .await
        .map_err(|e| OpsError::Refused(format!("backup writer: {e}")))?;
    let (manifest, bytes) = match (streamed, wrote) {
        (Ok(m), Ok(n)) => (m, n),
        (Err(e), _) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        (_, Err(e)) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("write", e));
        }
    };
    std::fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync", e))?;
    let removed = keep_last(dir, keep).map_err(|e| io("remove old backups", e))?;
    Ok(Written {
        path,
        bytes,
        manifest,
        removed,
    })
}

/// Removes all but the newest `keep` scheduled backups of `dir` (and the
/// temporary files of backups that never finished, once old).
fn keep_last(dir: &Path, keep: u32) -> std::io::Result<usize> {
    let mut backups = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("coffre-") && name.ends_with(".backup") {
            backups.push(name);
        } else if name.starts_with(".coffre-") && name.ends_with(".partial") {
            let old = entry
                .metadata()?
                .modified()?
                .elapsed()
                .is_ok_and(|a| a > Duration::from_secs(86_400));
            if old {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    backups.sort();
    let extra = backups.len().saturating_sub(keep as usize);
    for name in &backups[..extra] {
        std::fs::remove_file(dir.join(name))?;
    }
    Ok(extra)
}

/// Runs forever: a backup into `backup.dir` every `backup.interval_hours`
/// (the first one interval after the start), each recorded in the trail;
/// a failure raises a critical alert and the next interval tries again.
pub async fn schedule(vault: Arc<Vault>) {
    let Some(dir) = vault.backup.dir.clone() else {
        return;
    };
    let every = Duration::from_secs_f64(vault.backup.interval_hours * 3600.0);
    let keep = vault.backup.keep;
    loop {
        tokio::time::sleep(every).await;
        match write_to_dir(&vault, &dir, keep).await {
            Ok(w) => {
                vault.note_backup(w.manifest.created_unix_ms).await;
                tracing::info!(
                    path = %w.path.display(),
                    bytes = w.bytes,
                    audit_head_seq = w.manifest.audit_head_seq,
                    "scheduled backup written"
                );
                let event = crate::pb::AuditEvent {
                    tenant: "system".into(),
                    principal: "system/coffre".into(),
                    action: "backup/scheduled".into(),
                    outcome: "ok".into(),
                    fields: vec![
                        format!("audit_head_seq={}", w.manifest.audit_head_seq),
                        format!("bytes={}", w.bytes),
                    ],
                    purpose: format!(
                        "backup {} written; {} older removed",
                        w.path.file_name().unwrap_or_default().to_string_lossy(),
                        w.removed
                    ),
                    ..Default::default()
                };
                if let Err(e) = vault.audit.record(event).await {
                    tracing::error!(error = %e, "scheduled backup event not stored");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "scheduled backup failed");
                let alert = vault
                    .audit
                    .alert(
                        crate::audit::Severity::Critical,
                        "backup_failed",
                        "system",
                        "system/coffre",
                        format!("scheduled backup into backup.dir failed: {e}"),
                    )
                    .await;
                if let Err(e) = alert {
                    tracing::error!(error = %e, "backup failure alert not stored");
                }
            }
        }
    }
}
