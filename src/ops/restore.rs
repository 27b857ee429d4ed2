//! Offline work on backup files with the master key: `backup verify` (a
//! restore drill without restoring) and `restore` (into an empty data
//! directory, through a staging directory beside it).

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{BufReader, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{OpsError, backup::backed_up_space};
use crate::{
    audit::{Severity, log::ChainCheck},
    backup::{BackupError, Entry, Manifest, Reader, TenantCounts},
    config::Config,
    keys::{KeyError, KeyringSnapshot, MasterKey},
    store::{Batch, Space},
};

/// What a backup file holds, checked entry by entry.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    pub manifest: Manifest,
    /// Counts found in the file, per tenant.
    pub tenants: Vec<TenantCounts>,
    pub store_entries: u64,
    pub records: u64,
    /// Fields decrypted and authenticated.
    pub fields: u64,
    pub secrets: u64,
    /// Wrapped keys that opened under the master key.
    pub keys: usize,
    /// Audit events whose chain verified up to the manifest's head.
    pub events: u64,
    pub bytes: u64,
    /// Records left of a tenant shredded while the backup was taken (its
    /// keys were gone): unreadable by design, not counted as failures.
    pub shredded_leftovers: u64,
    /// Tenants whose shred the backup's own trail records (up to its head):
    /// never restored, with or without the shred list.
    pub shredded_in_trail: std::collections::BTreeSet<String>,
    /// Tenants the backup's key store holds as shredded.
    pub shredded_in_keys: Vec<String>,
}

/// Why a file is refused, naming the file.
fn refused(path: &Path, e: impl std::fmt::Display) -> OpsError {
    OpsError::Refused(format!("backup {}: {e}", path.display()))
}

fn open_reader(path: &Path, master: &MasterKey) -> Result<Reader<BufReader<fs::File>>, OpsError> {
    let f = fs::File::open(path).map_err(|e| refused(path, e))?;
    Reader::open(BufReader::with_capacity(1 << 20, f), master).map_err(|e| refused(path, e))
}

/// The size of `path`, for progress.
/// Whether the trail's event `e` records a tenant's shredding (the call,
/// or the alert raised when a shred finished, at open too).
fn is_shred(e: &crate::pb::AuditEvent) -> bool {
    !e.tenant.is_empty()
        && ((e.action == "coffre.v1.Admin/ShredTenant" && e.outcome == "ok")
            || e.action == "alert/tenant_shredded")
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Checks a backup file whole with `master`: its MAC and manifest, every
/// wrapped key, every record sealed as a whole and every field decrypted
/// and authenticated, every secret a password hash, the audit chain from
/// its first event to the manifest's head, and the counts against the
/// manifest. `progress(bytes read, file size)` is called as it goes.
pub fn verify_file(
    path: &Path,
    master: &MasterKey,
    mut progress: impl FnMut(u64, u64),
) -> Result<Verified, OpsError> {
    let total = file_len(path);
    let mut r = open_reader(path, master)?;
    let damaged = |what: String| refused(path, BackupError::Damaged(what));
    let mut v = Verified {
        manifest: r.manifest().clone(),
        ..Default::default()
    };
    let mut ring: Option<KeyringSnapshot> = None;
    let mut shredded: Vec<String> = Vec::new();
    let mut chain: Option<ChainCheck> = None;
    let mut tenant_keys: HashMap<String, Option<crate::keys::TenantKeys>> = HashMap::new();
    let mut per_space: BTreeMap<u32, u64> = BTreeMap::new();
    let mut tenants: BTreeMap<String, TenantCounts> = BTreeMap::new();
    let mut failed: Vec<String> = Vec::new();
    let mut shredded_in_trail = std::collections::BTreeSet::new();
    let mut next_report = 0u64;
    while let Some(entry) = r.next_entry().map_err(|e| refused(path, e))? {
        match entry {
            Entry::Keyring(bytes) => {
                if ring.is_some() {
                    return Err(damaged("two key stores".into()));
                }
                let snapshot = KeyringSnapshot::open(master, &bytes).map_err(|e| match e {
                    KeyError::WrongKey => {
                        refused(path, "its key store is under another master key")
                    }
                    e => damaged(format!("its key store: {e}")),
                })?;
                v.keys = snapshot
                    .check_all()
                    .map_err(|e| damaged(format!("its key store: {e}")))?;
                let audit = snapshot
                    .audit_key()
                    .map_err(|e| damaged(format!("its key store: {e}")))?;
                chain = Some(ChainCheck::new(crate::audit::log::Keys::new(audit)));
                shredded = snapshot.shredded();
                ring = Some(snapshot);
            }
            Entry::Store { space, key, value } => {
                let ring = ring
                    .as_ref()
                    .ok_or_else(|| damaged("entries before the key store".into()))?;
                let space = backed_up_space(space)
                    .ok_or_else(|| damaged("an entry of an unknown key space".into()))?;
                *per_space.entry(space as u32).or_default() += 1;
                v.store_entries += 1;
                if let Some(t) = super::backup::tenant_counts(&mut tenants, space, &key) {
                    match space {
                        Space::Records => t.records += 1,
                        Space::Principals => t.principals += 1,
                        Space::Secrets => t.secrets += 1,
                        Space::Index => t.index_entries += 1,
                        _ => {}
                    }
                }
                match space {
                    Space::Records => {
                        let (tenant, id) = crate::records::split_record_key(&key)
                            .ok_or_else(|| damaged("a record key does not parse".into()))?;
                        let keys = tenant_keys
                            .entry(tenant.to_string())
                            .or_insert_with(|| ring.tenant_keys(tenant).ok().flatten());
                        match keys {
                            Some(k) => match crate::records::check_stored(tenant, k, id, &value) {
                                Ok(n) => {
                                    v.records += 1;
                                    v.fields += n as u64;
                                }
                                Err(_) => failed.push(format!("{tenant}/{id}")),
                            },
                            None if shredded.iter().any(|s| s == tenant) => {
                                v.shredded_leftovers += 1;
                            }
                            None => failed.push(format!("{tenant}/{id} (no key)")),
                        }
                    }
                    Space::Secrets => {
                        let ok =
                            std::str::from_utf8(&value).is_ok_and(|s| s.starts_with("$argon2id$"));
                        if !ok {
                            failed.push("a secret that is not an Argon2id hash".into());
                        }
                        v.secrets += 1;
                    }
                    _ => {}
                }
            }
            Entry::TrailSegment(h) => {
                chain
                    .as_mut()
                    .ok_or_else(|| damaged("trail before the key store".into()))?
                    .segment(&h)
                    .map_err(damaged)?;
            }
            Entry::TrailFrame(raw) => {
                chain
                    .as_mut()
                    .ok_or_else(|| damaged("trail before the key store".into()))?
                    .frame(&raw, |e| {
                        if is_shred(e) {
                            shredded_in_trail.insert(e.tenant.clone());
                        }
                    })
                    .map_err(damaged)?;
            }
        }
        if r.bytes_read() >= next_report {
            progress(r.bytes_read(), total);
            next_report = r.bytes_read() + (4 << 20);
        }
    }
    v.bytes = r.bytes_read();
    progress(v.bytes, total);
    if ring.is_none() {
        return Err(damaged("no key store".into()));
    }
    let chain = chain.expect("set with the key store");
    let (seq, hash) = chain.head();
    if seq != v.manifest.audit_head_seq || hash.as_slice() != v.manifest.audit_head_hash.as_slice()
    {
        return Err(damaged(format!(
            "its trail ends at seq {seq}, its manifest says {}",
            v.manifest.audit_head_seq
        )));
    }
    v.events = chain.checked;
    v.shredded_in_trail = shredded_in_trail;
    v.shredded_in_keys = shredded;
    for s in &v.manifest.spaces {
        let found = per_space.get(&s.space).copied().unwrap_or(0);
        if found != s.entries {
            return Err(damaged(format!(
                "key space {} holds {found} entries, its manifest says {}",
                s.space, s.entries
            )));
        }
    }
    if !failed.is_empty() {
        let shown: Vec<&str> = failed.iter().take(5).map(String::as_str).collect();
        return Err(refused(
            path,
            format!(
                "{} stored items fail authentication (the vault held them damaged when the backup was taken): {}",
                failed.len(),
                shown.join(", ")
            ),
        ));
    }
    v.tenants = tenants.into_values().collect();
    Ok(v)
}

/// How `restore` treats the shred list.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Tenants on the shred list to bring back all the same (a court
    /// order): taken off the list, and said in the trail with `reason`.
    pub restore_shredded: Vec<String>,
    pub reason: Option<String>,
    /// Run without a shred list whose MAC checks (lost with the key's
    /// escrow): needs `reason`, said in the trail with a critical alert.
    /// Tenants whose shred the backup's own trail records stay out.
    pub no_shred_list: bool,
    /// Who runs it, for the trail.
    pub operator: String,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub verified: Verified,
    /// Tenants on the shred list left out of the restore.
    pub dropped: Vec<String>,
    /// The seq of the restore's event in the restored trail.
    pub restore_seq: u64,
}

/// The staging directory of a restore into `target`: beside it (same
/// filesystem, so the final rename is atomic), named after it.
pub fn staging_dir(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    target.with_file_name(format!(".{name}.coffre-restore"))
}

fn is_empty_dir(p: &Path) -> std::io::Result<bool> {
    Ok(fs::read_dir(p)?.next().is_none())
}

/// Whether `key` of `space` belongs to one of `tenants`.
fn of_tenants(tenants: &[String], space: Space, key: &[u8]) -> bool {
    tenants.iter().any(|t| match space {
        Space::Tenants => key == t.as_bytes(),
        Space::Records
        | Space::Index
        | Space::Secrets
        | Space::Counters
        | Space::Principals
        | Space::Budgets => {
            key.len() > t.len() && key.starts_with(t.as_bytes()) && key[t.len()] == 0
        }
        _ => false,
    })
}

/// Restores `from` into `config.data_dir`, which must not exist or be an
/// empty directory. The file is verified whole first ([`verify_file`]):
/// a bad file writes nothing. Then it is written into a staging directory
/// beside the target (removed and started over if a killed restore left
/// one), without the tenants on the shred list, an event naming the backup
/// is appended to the restored trail, and the staging directory is renamed
/// into place: killed at any point, the target is still empty, and running
/// the restore again works.
pub async fn restore(
    config: &Config,
    from: &Path,
    opts: &RestoreOptions,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<Restored, OpsError> {
    let postgres = match (&config.storage.backend, &config.storage.postgres_url) {
        (crate::config::StorageBackend::Postgres, Some(url)) => {
            Some(crate::store::PostgresOptions {
                url: url.expose().to_string(),
                pool_size: 4,
            })
        }
        _ => None,
    };
    let target = &config.data_dir;
    match fs::metadata(target) {
        _ if postgres.is_some() => {}
        Ok(m) if !m.is_dir() => {
            return Err(OpsError::Refused(format!(
                "data_dir {} is not a directory",
                target.display()
            )));
        }
        Ok(_) if !is_empty_dir(target).map_err(|e| OpsError::Refused(e.to_string()))? => {
            return Err(OpsError::Refused(format!(
                "data_dir {} is not empty: restore writes only into an empty or new directory (move the old one aside)",
                target.display()
            )));
        }
        _ => {}
    }
    let master = crate::keys::load_key_file(&config.master_key_file)?;
    let no_reason = opts.reason.as_deref().is_none_or(|r| r.trim().is_empty());
    if !opts.restore_shredded.is_empty() && no_reason {
        return Err(OpsError::Refused(
            "--restore-shredded needs --reason (it is written to the audit trail)".into(),
        ));
    }
    if opts.no_shred_list && no_reason {
        return Err(OpsError::Refused(
            "--no-shred-list needs --reason (it is written to the audit trail, with a critical alert)".into(),
        ));
    }
    let path = config.shred_list_path();
    let mut list = if opts.no_shred_list {
        crate::shredlist::ShredList::unread(&path, master.shred_list_key())
    } else {
        let list =
            crate::shredlist::ShredList::load(&path, master.shred_list_key()).map_err(|e| {
                OpsError::Refused(format!(
                    "{e}; or restore with --no-shred-list --reason TEXT (audited, critical alert)"
                ))
            })?;
        if !list.existed() {
            return Err(OpsError::Refused(format!(
                "no shred list at {}: a restore without it could bring back shredded tenants; put back the copy escrowed with the master key, or restore with --no-shred-list --reason TEXT (audited, critical alert)",
                path.display()
            )));
        }
        list
    };
    // 1. The whole file, checked before anything is written.
    let verified = verify_file(from, &master, |d, t| progress("verify", d, t))?;
    if !opts.no_shred_list {
        let m = &verified.manifest;
        if list.legacy() && m.shred_list_count.is_some() {
            return Err(OpsError::Refused(format!(
                "shred list {} is in the unauthenticated format of an earlier release, but this backup was made under an authenticated one: it was replaced; put back the copy escrowed with the master key",
                path.display()
            )));
        }
        if let Some(n) = m.shred_list_count
            && list.count() < n
        {
            return Err(OpsError::Refused(format!(
                "shred list {} names {} tenants, fewer than the {n} it named when this backup was made: it is older than the backup (rolled back or replaced); put back the copy escrowed with the master key",
                path.display(),
                list.count()
            )));
        }
        if list.legacy() {
            list.save().map_err(KeyError::from)?;
        }
    }
    if opts.no_shred_list {
        // The restored vault needs a list to start: one made anew from
        // what the backup knows was shredded, whatever was there moved
        // aside (it may be evidence).
        if path.exists() {
            let aside = path.with_extension(format!("replaced-{}", crate::clock::now_ms()));
            fs::rename(&path, &aside).map_err(|e| io_err(&path, e))?;
        }
        let now = crate::clock::now_ms();
        for t in verified
            .shredded_in_trail
            .iter()
            .chain(&verified.shredded_in_keys)
        {
            if !opts.restore_shredded.contains(t) {
                list.add(t, now).map_err(KeyError::from)?;
            }
        }
        list.save().map_err(KeyError::from)?;
    }
    for t in &opts.restore_shredded {
        if !list.contains(t) && !verified.shredded_in_trail.contains(t) {
            return Err(OpsError::Refused(format!(
                "tenant {t} is not on the shred list {} nor shredded in the backup's trail",
                list.path().display()
            )));
        }
    }
    if let Some(pg) = postgres {
        return restore_into_postgres(
            config, pg, from, &master, &mut list, opts, verified, progress,
        )
        .await;
    }
    // 2. Written into the staging directory.
    let staging = staging_dir(target);
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .map_err(|e| OpsError::Refused(format!("{}: {e}", staging.display())))?;
    }
    let written = write_staging(
        config,
        from,
        &master,
        &list,
        opts,
        &verified,
        &staging,
        &mut progress,
    )
    .await;
    let (dropped, restore_seq) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // What the embedded store wrote is the vault's alone, as at a start.
    crate::vault::narrow_data_dir(&staging, &[]).map_err(|e| OpsError::Refused(e.to_string()))?;
    // 3. Into place. The court-order override leaves the list first: a
    // crash between the two keeps the tenant shredded at the next start.
    for t in &opts.restore_shredded {
        list.remove(t).map_err(KeyError::from)?;
    }
    // rename(2) replaces an empty target directory.
    fs::rename(&staging, target).map_err(|e| {
        OpsError::Refused(format!(
            "moving {} to {}: {e} (data_dir must not be a mount point: mount its parent)",
            staging.display(),
            target.display()
        ))
    })?;
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| OpsError::Refused(format!("{}: {e}", parent.display())))?;
    Ok(Restored {
        verified,
        dropped,
        restore_seq,
    })
}

/// Where a restore writes: a staging directory (sled), or an empty
/// PostgreSQL database.
enum Sink {
    Dir {
        staging: PathBuf,
        store: crate::store::Storage,
        segment: Option<(PathBuf, fs::File)>,
    },
    Db {
        opts: crate::store::PostgresOptions,
        store: crate::store::Storage,
        trail: Option<Box<crate::audit::TrailImport>>,
    },
}

fn io_err(what: &Path, e: std::io::Error) -> OpsError {
    OpsError::Refused(format!("{}: {e}", what.display()))
}

impl Sink {
    fn store(&self) -> &crate::store::Storage {
        match self {
            Sink::Dir { store, .. } | Sink::Db { store, .. } => store,
        }
    }

    fn keyring(&mut self, master: &MasterKey, sealed: Vec<u8>) -> Result<(), OpsError> {
        match self {
            Sink::Dir { staging, .. } => {
                crate::store::AtomicFile::new(staging.join(crate::keys::KEYRING_FILE))
                    .replace(&sealed)?;
            }
            Sink::Db { opts, trail, .. } => {
                let ring = KeyringSnapshot::open(master, &sealed)?;
                *trail = Some(Box::new(crate::audit::TrailImport::new(
                    opts,
                    ring.audit_key()?,
                )?));
                crate::store::postgres::KeyStoreRow::new(opts).modify(
                    |current| -> Result<_, OpsError> {
                        match current {
                            None => Ok((sealed, ())),
                            Some(_) => Err(OpsError::Refused(
                                "the database already holds a key store: restore writes only into an empty database".into(),
                            )),
                        }
                    },
                )?;
            }
        }
        Ok(())
    }

    fn segment(&mut self, from: &Path, h: Vec<u8>) -> Result<(), OpsError> {
        match self {
            Sink::Dir {
                staging, segment, ..
            } => {
                if let Some((p, f)) = segment.take() {
                    f.sync_all().map_err(|e| io_err(&p, e))?;
                }
                let name = crate::audit::log::segment_file_name(&h)
                    .ok_or_else(|| refused(from, "an audit segment header is short"))?;
                let p = crate::audit::trail_dir(staging).join(name);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                    .map_err(|e| io_err(&p, e))?;
                f.write_all(&h).map_err(|e| io_err(&p, e))?;
                *segment = Some((p, f));
            }
            Sink::Db { trail, .. } => trail
                .as_mut()
                .ok_or_else(|| refused(from, "an audit segment before the key store"))?
                .segment(&h)
                .map_err(|e| refused(from, e))?,
        }
        Ok(())
    }

    fn frame(&mut self, from: &Path, raw: Vec<u8>) -> Result<(), OpsError> {
        match self {
            Sink::Dir { segment, .. } => {
                let (p, f) = segment
                    .as_mut()
                    .ok_or_else(|| refused(from, "an audit frame before its segment"))?;
                f.write_all(&raw).map_err(|e| io_err(p, e))?;
            }
            Sink::Db { trail, .. } => trail
                .as_mut()
                .ok_or_else(|| refused(from, "an audit frame before the key store"))?
                .frame(raw)
                .map_err(|e| refused(from, e))?,
        }
        Ok(())
    }

    /// Everything written made durable; the trail's head set.
    fn finish(&mut self) -> Result<(), OpsError> {
        match self {
            Sink::Dir { segment, .. } => {
                if let Some((p, f)) = segment.take() {
                    f.sync_all().map_err(|e| io_err(&p, e))?;
                }
            }
            Sink::Db { trail, .. } => {
                if let Some(t) = trail.as_mut() {
                    t.finish()?;
                }
            }
        }
        Ok(())
    }

    /// The key ring and the trail of what was written.
    async fn open(
        &self,
        config: &Config,
        master: &MasterKey,
    ) -> Result<(crate::keys::Keyring, crate::audit::Audit), OpsError> {
        let store = self.store().clone();
        let home = match self {
            Sink::Dir { staging, .. } => crate::keys::KeyHome::in_dir(staging),
            Sink::Db { opts, .. } => crate::keys::KeyHome::Db(
                crate::store::postgres::KeyStoreRow::new(opts),
                crate::store::PostgresBackend::pool(opts)?,
            ),
        };
        let ring = crate::keys::Keyring::open(store.clone(), home, master, u64::MAX).await?;
        let audit_key = crate::crypto::SecretKey::from_slice(ring.audit_key().expose())
            .expect("audit key is KEY_LEN bytes");
        // The restore's event goes to the mirror and alert files too: the
        // mirror then shows the trail going back to the backup's head (its
        // check, `audit verify --mirror`, knows a restore event by its action).
        let audit = match self {
            Sink::Dir { staging, .. } => {
                crate::audit::Audit::open(
                    store,
                    audit_key,
                    staging,
                    config.audit.mirror_file.as_deref(),
                    config.alert_file.as_deref(),
                )
                .await?
            }
            Sink::Db { opts, .. } => crate::audit::Audit::open_postgres(
                opts,
                store,
                audit_key,
                config.audit.mirror_file.as_deref(),
                config.alert_file.as_deref(),
            )?,
        };
        Ok((ring, audit))
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_staging(
    config: &Config,
    from: &Path,
    master: &MasterKey,
    list: &crate::shredlist::ShredList,
    opts: &RestoreOptions,
    verified: &Verified,
    staging: &Path,
    progress: &mut impl FnMut(&str, u64, u64),
) -> Result<(Vec<String>, u64), OpsError> {
    if let Some(parent) = staging.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| io_err(parent, e))?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(staging)
        .map_err(|e| io_err(staging, e))?;
    let trail_dir = crate::audit::trail_dir(staging);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&trail_dir)
        .map_err(|e| io_err(&trail_dir, e))?;
    let store = crate::store::Storage::open_sled(
        staging,
        &crate::store::SledOptions {
            cache_capacity_bytes: config.storage.cache_capacity_mib * 1024 * 1024,
        },
    )?;
    let mut sink = Sink::Dir {
        staging: staging.to_path_buf(),
        store,
        segment: None,
    };
    write_into(
        &mut sink, config, from, master, list, opts, verified, progress,
    )
    .await
}

/// [`restore`] into the PostgreSQL database of `pg`, which must hold no
/// vault: a marker row is written first (a node refuses to start while it
/// is there; a rerun empties what a killed restore left and starts over),
/// then everything, then the restore's event; the marker goes last.
#[allow(clippy::too_many_arguments)]
async fn restore_into_postgres(
    config: &Config,
    pg: crate::store::PostgresOptions,
    from: &Path,
    master: &MasterKey,
    list: &mut crate::shredlist::ShredList,
    opts: &RestoreOptions,
    verified: Verified,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<Restored, OpsError> {
    use crate::store::postgres::{RESTORING, RestoreTarget};
    let backend = Arc::new(crate::store::PostgresBackend::open(&pg).await?);
    match backend.restore_target().await? {
        RestoreTarget::Empty => {}
        RestoreTarget::Interrupted => backend.wipe_interrupted_restore().await?,
        RestoreTarget::Used => {
            return Err(OpsError::Refused(
                "the PostgreSQL database already holds a vault: restore writes only into an empty database (create a new one)".into(),
            ));
        }
    }
    let store = crate::store::Storage::new(backend.clone());
    let mut b = Batch::new();
    b.put(Space::Meta, RESTORING.to_vec(), Vec::new());
    store.commit(b).await?;
    let mut sink = Sink::Db {
        opts: pg,
        store: store.clone(),
        trail: None,
    };
    let (dropped, restore_seq) = write_into(
        &mut sink,
        config,
        from,
        master,
        list,
        opts,
        &verified,
        &mut progress,
    )
    .await?;
    for t in &opts.restore_shredded {
        list.remove(t).map_err(KeyError::from)?;
    }
    let mut b = Batch::new();
    b.delete(Space::Meta, RESTORING.to_vec());
    store.commit(b).await?;
    Ok(Restored {
        verified,
        dropped,
        restore_seq,
    })
}

/// Writes the verified file into `sink`, then appends the restore's
/// events to the trail written. Returns the tenants left out (shredded)
/// and the restore event's seq.
#[allow(clippy::too_many_arguments)]
async fn write_into(
    sink: &mut Sink,
    config: &Config,
    from: &Path,
    master: &MasterKey,
    list: &crate::shredlist::ShredList,
    opts: &RestoreOptions,
    verified: &Verified,
    progress: &mut impl FnMut(&str, u64, u64),
) -> Result<(Vec<String>, u64), OpsError> {
    let total = file_len(from);
    let mut r = open_reader(from, master)?;
    let mut dropped = Vec::new();
    let mut batch = Batch::new();
    let mut next_report = 0u64;
    while let Some(entry) = r.next_entry().map_err(|e| refused(from, e))? {
        match entry {
            Entry::Keyring(bytes) => {
                let ring = KeyringSnapshot::open(master, &bytes)?;
                dropped = ring
                    .tenants()
                    .into_iter()
                    .filter(|t| {
                        (list.contains(t) || verified.shredded_in_trail.contains(t))
                            && !opts.restore_shredded.contains(t)
                    })
                    .collect();
                sink.keyring(master, ring.sealed_without(&dropped))?;
            }
            Entry::Store { space, key, value } => {
                let space = backed_up_space(space)
                    .ok_or_else(|| refused(from, "an entry of an unknown key space"))?;
                if of_tenants(&dropped, space, &key) {
                    continue;
                }
                batch.put(space, key, value);
                if batch.0.len() >= 1024 {
                    sink.store().apply(std::mem::take(&mut batch)).await?;
                }
            }
            Entry::TrailSegment(h) => sink.segment(from, h)?,
            Entry::TrailFrame(raw) => sink.frame(from, raw)?,
        }
        if r.bytes_read() >= next_report {
            progress("restore", r.bytes_read(), total);
            next_report = r.bytes_read() + (4 << 20);
        }
    }
    // The file authenticated whole again at its end (it could have changed
    // since the verification): only now is anything kept.
    progress("restore", total, total);
    if !batch.is_empty() {
        sink.store().apply(batch).await?;
    }
    sink.finish()?;
    sink.store().sync().await?;
    let (ring, audit) = sink.open(config, master).await?;
    let recorded = mark_restore(&audit, from, verified, &dropped, opts).await?;
    drop(audit);
    drop(ring);
    sink.store().flush_blocking()?;
    Ok((dropped, recorded))
}

/// Appends the restore's event (naming the backup) and, for each tenant
/// restored despite the shred list, a critical alert; returns the
/// restore event's seq.
async fn mark_restore(
    audit: &crate::audit::Audit,
    from: &Path,
    verified: &Verified,
    dropped: &[String],
    opts: &RestoreOptions,
) -> Result<u64, OpsError> {
    let m = &verified.manifest;
    if audit.head().0 != m.audit_head_seq {
        return Err(refused(
            from,
            "the restored trail does not end at the backup's head",
        ));
    }
    let created = chrono::DateTime::from_timestamp_millis(m.created_unix_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    let mut purpose = format!(
        "restored from a backup created {created} (audit head seq {}); events after that head on the vault it came from are not in this trail",
        m.audit_head_seq
    );
    if !dropped.is_empty() {
        purpose.push_str(&format!("; left out as shredded: {}", dropped.join(", ")));
    }
    if !opts.restore_shredded.is_empty() {
        purpose.push_str(&format!(
            "; restored despite the shred list: {}",
            opts.restore_shredded.join(", ")
        ));
    }
    let principal = format!("system/cli:{}", opts.operator);
    let event = crate::pb::AuditEvent {
        tenant: "system".into(),
        principal: principal.clone(),
        role: "admin".into(),
        purpose,
        fields: vec![
            format!("backup_head_seq={}", m.audit_head_seq),
            format!("backup_head_hash={}", hex::encode(&m.audit_head_hash)),
            format!("backup_created_unix_ms={}", m.created_unix_ms),
            format!("backup_key={}", m.key_id()),
        ],
        ..Default::default()
    };
    let recorded = audit
        .alert_event(Severity::Warning, "restore", event)
        .await?;
    // An override of the shred list: a critical alert naming the operator
    // and the reason given.
    let critical = async |kind: &str, tenant: &str, what: &str| {
        audit
            .alert_event(
                Severity::Critical,
                kind,
                crate::pb::AuditEvent {
                    tenant: tenant.to_string(),
                    principal: principal.clone(),
                    role: "admin".into(),
                    purpose: format!(
                        "{what}; reason: {}",
                        opts.reason.as_deref().unwrap_or_default()
                    ),
                    ..Default::default()
                },
            )
            .await
    };
    if opts.no_shred_list {
        critical(
            "restore_without_shred_list",
            "system",
            "restored without a shred list whose MAC checks; only the backup's own trail kept shredded tenants out",
        )
        .await?;
    }
    for t in &opts.restore_shredded {
        critical(
            "shred_override",
            t,
            "tenant restored despite the shred list",
        )
        .await?;
    }
    Ok(recorded.seq)
}
